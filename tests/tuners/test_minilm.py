"""KRAdapter on a real pretrained model shipped offline: all-MiniLM-L6-v2."""

from __future__ import annotations

import torch
from peft import PeftModel, get_peft_model

from kradapter import KRAdapterConfig
from kradapter.tuners.kradapter import KRAdapterLayer


def test_minilm_adapt_save_load_merge(minilm_path, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    batch = tokenizer(["Khatri-Rao adapters reach high rank.", "A second sentence"], padding=True, return_tensors="pt")
    model = get_peft_model(
        AutoModel.from_pretrained(minilm_path), KRAdapterConfig(target_modules=["query", "value"], init_weights=False)
    ).eval()
    layers = [m for m in model.modules() if isinstance(m, KRAdapterLayer)]
    assert len(layers) == 12 and all((m.in_features, m.out_features) == (384, 384) for m in layers)
    # 384x384: r = 19, r2 = 21 -> 384 * 40 per layer
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 12 * 384 * 40
    with torch.no_grad():
        out = model(**batch).last_hidden_state
        with model.disable_adapter():
            base = model(**batch).last_hidden_state
    assert not torch.allclose(out, base)
    model.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(AutoModel.from_pretrained(minilm_path), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).last_hidden_state, out, rtol=0, atol=0)
        plain = again.merge_and_unload()
        torch.testing.assert_close(plain(**batch).last_hidden_state, out, rtol=1e-4, atol=1e-4)
