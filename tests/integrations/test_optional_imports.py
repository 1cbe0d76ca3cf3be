"""The integrations are optional extras: nothing outside fgtrac_assets/integrations/*.py imports their frameworks."""

import subprocess
import sys

FRAMEWORKS = ("lightning", "pytorch_lightning", "transformers", "accelerate")


def test_the_package_and_its_session_api_import_no_training_framework():
    code = ("import sys, fgtrac_assets as fg, fgtrac_assets.session, fgtrac_assets.integrations, fgtrac_assets.cli; "
            "fg.track; print(sorted(m for m in %r if m in sys.modules))" % (FRAMEWORKS,))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr
