"""The application: the ``headprune`` command line (:mod:`.cli`, :mod:`.commands`), resolving its
MODEL argument (:mod:`.load`), calibration and held-out texts (:mod:`.texts`), label-free
evaluation (:mod:`.evaluate`), sweeps (:mod:`.sweep`) and pictures (:mod:`.plots`)."""
