"""``python -m ascend_patches``: print what is patched on this machine and why."""

import ascend_patches

print(ascend_patches.report(import_targets=True))
