"""``python -m ascend_patches [--all | --json]``: what is patched on this machine, and why.

The default is a short summary (backend, versions, counts, and every patch not applied with
its reason); ``--all`` lists every patch with its target; ``--json`` gives the same as data.
"""

import argparse
import json
import warnings

# megatron's notice that Apex / Transformer Engine are absent is what this report explains
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex) (and Apex )?(are|is) not installed.*")

import ascend_patches  # noqa: E402

p = argparse.ArgumentParser(prog="python -m ascend_patches", description=__doc__.splitlines()[0])
g = p.add_mutually_exclusive_group()
g.add_argument("--all", action="store_true", help="every patch, with its target and why")
g.add_argument("--json", action="store_true", help="the report as JSON")
args = p.parse_args()
if args.json:
    print(json.dumps(ascend_patches.summary(import_targets=True), indent=1))
elif args.all:
    print(ascend_patches.report(import_targets=True))
else:
    print(ascend_patches.short_report(import_targets=True))
