"""``python -m ascend_patches``: print what is patched on this machine and why."""

import warnings

# megatron's notice that Apex / Transformer Engine are absent is what this report explains
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex) (and Apex )?(are|is) not installed.*")

import ascend_patches  # noqa: E402

print(ascend_patches.report(import_targets=True))
