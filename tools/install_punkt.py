"""Install NLTK's punkt_tab sentence-splitter data offline, for `preprocess --split-sentences`.

No NLTK data package exists on PyPI or Debian, but the llama-index-core wheel ships it. This downloads that wheel
from the package registry (without installing it) and extracts only `tokenizers/punkt_tab` into
PREFIX/nltk_data (default: this Python's sys.prefix, a directory NLTK searches by default).

    python tools/install_punkt.py [--prefix DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llama-index-core==0.14.25"
MEMBER = "llama_index/core/_static/nltk_cache/"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefix", default=sys.prefix, help="NLTK data goes to PREFIX/nltk_data")
    target = Path(ap.parse_args().prefix) / "nltk_data"
    if (target / "tokenizers" / "punkt_tab" / "english").is_dir():
        print(f"punkt_tab already in {target}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        res = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", tmp],
                             capture_output=True, text=True)
        if res.returncode != 0:
            print(f"warning: could not download {WHEEL}; --split-sentences will need NLTK_DATA\n{res.stderr[-500:]}",
                  file=sys.stderr)
            return 1
        with zipfile.ZipFile(next(Path(tmp).glob("*.whl"))) as z:
            for name in z.namelist():
                if name.startswith(MEMBER + "tokenizers/punkt_tab/") and not name.endswith("/"):
                    out = target / name[len(MEMBER):]
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(z.read(name))
    print(f"punkt_tab installed in {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
