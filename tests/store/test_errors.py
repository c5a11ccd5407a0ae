"""Bad input fails early with an error that names the module or value."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

from kradapter import KRAdapterConfig
from tests import support


def test_target_that_matches_nothing(tiny_bert):
    with pytest.raises(ValueError, match="not_a_layer"):
        get_peft_model(tiny_bert(), KRAdapterConfig(target_modules=["not_a_layer"]))


def test_non_linear_target_names_the_module(tiny_bert):
    with pytest.raises(TypeError, match=r"'embeddings.word_embeddings'.*Embedding"):
        get_peft_model(tiny_bert(), KRAdapterConfig(target_modules=["word_embeddings"]))


@pytest.mark.parametrize("scaling", [float("nan"), float("inf"), "2"])
def test_non_finite_scaling(scaling):
    with pytest.raises(ValueError, match="scaling"):
        KRAdapterConfig(target_modules=["query"], scaling=scaling)


@pytest.mark.parametrize(("field", "value"), [("factorization", "sqrt_mean"), ("execution", "fast"), ("dropout", 1.5)])
def test_bad_choice_is_named(field, value):
    with pytest.raises(ValueError, match=str(value)):
        KRAdapterConfig(target_modules=["query"], **{field: value})


def test_loading_onto_a_base_of_other_shapes(tiny_bert, tmp_path):
    from transformers import BertModel

    get_peft_model(tiny_bert(), KRAdapterConfig(target_modules=["query"])).save_pretrained(tmp_path)
    other = BertModel(support.tiny_bert_config(hidden_size=40))
    with pytest.raises(ValueError, match=r"encoder\.layer\.0\.attention\.self\.query.*40x40"):
        PeftModel.from_pretrained(other, tmp_path)


def test_wrong_input_width_is_named(tiny_bert):
    model = get_peft_model(tiny_bert(), KRAdapterConfig(target_modules=["query"]))
    layer = model.base_model.model.encoder.layer[0].attention.self.query
    with pytest.raises(ValueError, match="29 features"):
        layer(torch.zeros(2, 29))
