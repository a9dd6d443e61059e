"""The core never imports transformers or open_clip; entry points that need them name the extra."""

from __future__ import annotations

import subprocess
import sys

import pytest

import tokenbudget as tb


def test_core_and_timm_patching_import_no_optional_framework() -> None:
    code = (
        "import sys, torch, tokenbudget as tb\n"
        "from timm.models.vision_transformer import VisionTransformer\n"
        "m = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2).eval()\n"
        "tb.apply(m, tb.ToMe(r=2)); m(torch.randn(1, 3, 32, 32)); tb.remove(m)\n"
        "print(sorted(n for n in ('transformers', 'open_clip') if n in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_hf_entry_point_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'tokenbudget\[hf\]'"):
        tb.models.timm_dinov2_to_hf(tb.models.dinov2_small(img_size=28, pretrained=False))
