"""python -m megatron_prune.demo.reference [RESULTS.json ...] [--readme README.md] [--check]

Take `make demo` / `make demo-quick` results (demo_out/demo_results.json) into megatron_prune/demo/reference.json,
the one place the README's demo numbers live, and rewrite the README's demo section from it (between the
`<!-- demo-full -->` and `<!-- demo-quick -->` markers). Without RESULTS, only re-render; `--check` changes nothing
and exits 1 when the README and reference.json disagree.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from megatron_prune.demo.report import REFERENCE, load_reference, render_quick, render_tables

README = Path(__file__).resolve().parents[2] / "README.md"
MARKERS = {"full": ("<!-- demo-full -->\n", "\n<!-- /demo-full -->"),
           "quick": ("<!-- demo-quick -->", "<!-- /demo-quick -->")}


def render_readme(text: str, reference: dict) -> str:
    """`text` with each marked demo block replaced by its rendering from `reference`."""
    for kind, (start, end) in MARKERS.items():
        if start not in text or end not in text:
            raise SystemExit(f"error: README has no {start.strip()} ... {end.strip()} block")
        body = render_tables(reference[kind]) if kind == "full" else render_quick(reference[kind])
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: start + body + end, text, flags=re.S)
    return text


def take(reference: dict, results: dict) -> dict:
    kind = "quick" if results.get("quick") else "full"
    keep = ("model", "quick", "stages", "megatron", "hf", "identical_tensors", "recovery", "environment")
    return {**reference, kind: {k: results[k] for k in keep if k in results}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megatron_prune.demo.reference", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="*", help="demo_results.json of a full and/or a quick demo run")
    ap.add_argument("--readme", default=str(README), help="the README to rewrite (default: this checkout's)")
    ap.add_argument("--check", action="store_true", help="only check that README and reference.json agree")
    args = ap.parse_args(argv)
    reference = load_reference(REFERENCE)
    for path in args.results:
        reference = take(reference, json.loads(Path(path).read_text()))
    readme = Path(args.readme)
    text = readme.read_text()
    new = render_readme(text, reference)
    if args.check:
        if new != text:
            print(f"error: {readme}'s demo section differs from {REFERENCE} (run python -m "
                  "megatron_prune.demo.reference)", file=sys.stderr)
            return 1
        print(f"{readme} agrees with {REFERENCE}")
        return 0
    if args.results:
        REFERENCE.write_text(json.dumps(reference, indent=1) + "\n")
    readme.write_text(new)
    print(f"wrote {REFERENCE} and {readme}'s demo section")
    return 0


if __name__ == "__main__":
    sys.exit(main())
