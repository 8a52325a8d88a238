"""Session settings: transformers' progress bars and notices off. Tests read stderr line by line,
and ``headprune --quiet`` turns them off only while its command runs."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _quiet_transformers():
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # the native-op tests run without transformers
        yield
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    yield
