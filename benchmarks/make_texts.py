"""Build the calibration / check texts in python/headprune/app/data/ from Debian packages.

Inputs (extracted with `apt-get download` + `dpkg-deb -x` into /tmp/debs):
  r-cran-janeaustenr 1.0.0-1  -> Persuasion (Jane Austen, 1818; public domain), Volume I (ch. 1-12)
  python3.11-doc 3.11.2-6+deb12u*  -> The Python Tutorial (reST sources), code/markup stripped
  libpython3.11-stdlib 3.11.2-6+deb12u*  -> Python source code of a few standard-library modules, unchanged
The Austen data is an R lazy-load DB; it is read with the `rdata` PyPI package (pip --target /tmp/pylib).
"""
import gzip, glob, os, re, sys, zlib
OUT = os.path.join(os.path.dirname(__file__), "..", "python", "headprune", "app", "data")

def austen():
    sys.path.insert(0, "/tmp/pylib")
    import rdata
    d = "/tmp/debs/jr/usr/lib/R/site-library/janeaustenr/data/Rdata"
    idx = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(open(d + ".rdx", "rb").read())))
    off, ln = (int(x) for x in idx["variables"]["persuasion"])
    raw = open(d + ".rdb", "rb").read()[off:off + ln]
    lines = [str(x) for x in rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(raw[4:])))]
    paras, cur, chapter = [], [], 0
    for l in lines:
        s = l.strip()
        m = re.fullmatch(r"Chapter (\d+)", s)
        if m:
            chapter = int(m.group(1))
            if cur: paras.append(" ".join(cur)); cur = []
            if chapter == 13 and len(paras) > 50:  # Volume II starts again at "Chapter 13"
                break
            continue
        if chapter == 0:
            continue
        if not s:
            if cur: paras.append(" ".join(cur)); cur = []
        else:
            cur.append(s)
    if cur: paras.append(" ".join(cur))
    paras = [re.sub(r"\s+", " ", p) for p in paras]
    return paras

def rst_clean(text):
    out, cur = [], []
    lines = text.splitlines()
    i = 0
    def flush():
        if cur:
            p = " ".join(cur)
            p = re.sub(r":[a-z]+(?::[a-z]+)?:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`", r"\1", p)
            p = re.sub(r"`([^`<]+?)\s*<[^>]+>`__?", r"\1", p)
            p = re.sub(r"``([^`]+)``", r"\1", p)
            p = re.sub(r"`([^`]+)`_?", r"\1", p)
            p = re.sub(r"\*\*([^*]+)\*\*", r"\1", p)
            p = re.sub(r"(?<!\w)\*([^*\s][^*]*)\*", r"\1", p)
            p = re.sub(r"\[#[^\]]*\]_", "", p)
            p = re.sub(r"\|([^|]+)\|", r"\1", p)
            p = re.sub(r"\s+", " ", p).strip()
            if p.endswith("::"): p = p[:-1]
            p = p.replace(" ::", ":") if p.endswith(":") else p
            if len(p.split()) >= 4:
                out.append(p)
            cur.clear()
    while i < len(lines):
        l = lines[i]; s = l.strip()
        if l.startswith((" ", "\t")) and s:
            flush(); i += 1; continue            # indented: code, directive bodies, quotes
        if not s:
            flush(); i += 1; continue
        if s.startswith(".. ") or s.startswith(">>>") or s.startswith("..."):
            flush(); i += 1; continue
        if re.fullmatch(r"([=\-~^*#\"'+`])\1{2,}", s):
            cur.clear(); i += 1; continue      # section underline: drop title
        if s.startswith(("* ", "- ", "#. ")) or re.match(r"\d+\. ", s):
            flush(); cur.append(re.sub(r"^(\*|-|#\.|\d+\.)\s+", "", s)); i += 1; continue
        if "|" in s and s.startswith("+") or s.startswith("+-") or s.startswith("==="):
            flush(); i += 1; continue
        cur.append(s); i += 1
    flush()
    return out

def tutorial():
    base = glob.glob("/tmp/debs/pyd/usr/share/doc/python3.11/html/_sources/tutorial")[0]
    order = ["appetite", "interpreter", "introduction", "controlflow", "datastructures", "modules",
             "inputoutput", "errors", "classes", "stdlib", "stdlib2", "venv", "whatnow",
             "interactive", "floatingpoint", "appendix"]
    paras = []
    for n in order:
        paras += rst_clean(open(os.path.join(base, n + ".rst.txt"), encoding="utf-8").read())
    return paras

#: standard-library modules of python_code.txt, in this order (pure Python, code and docstrings)
CODE_MODULES = ["argparse.py", "textwrap.py", "shlex.py", "json/__init__.py", "json/decoder.py",
                "json/encoder.py", "json/scanner.py"]


def python_code():
    """The modules' source, one file after another; blank lines separate paragraphs, and each
    paragraph's whitespace is collapsed (written one paragraph per line, see SOURCES.md)."""
    base = next((b for b in glob.glob("/tmp/debs/stdlib/usr/lib/python3.11")), "/usr/lib/python3.11")
    paras = []
    for n in CODE_MODULES:
        text = open(os.path.join(base, n), encoding="utf-8").read()
        paras += [" ".join(b.split()) for b in re.split(r"\n\s*\n", text) if b.strip()]
    return paras


if __name__ == "__main__":
    for name, paras in [("persuasion", austen()), ("python_tutorial", tutorial()), ("python_code", python_code())]:
        txt = "\n\n".join(paras) + "\n"
        open(os.path.join(OUT, name + ".txt"), "w", encoding="utf-8").write(txt)
        print(name, len(paras), "paragraphs", len(txt.encode()), "bytes", sum(len(p.split()) for p in paras), "words")
