import torch
from transformers import AutoModelForSequenceClassification

from hpc_kd.models import choose_layers, load_classifier, load_pretrained, load_tokenizer, save_model, shrink


def test_choose_layers():
    assert choose_layers(12, 11, "uniform") == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11]
    assert choose_layers(6, 3, "uniform") == [0, 2, 5]
    assert choose_layers(6, 3, "first") == [0, 1, 2]
    assert choose_layers(6, 1, "uniform") == [5]
    assert choose_layers(6, 2, "random") == []


def test_shrink_copies_the_chosen_layers(tiny_model):
    model = load_pretrained(str(tiny_model), 2, seed=0)
    small = shrink(model, 2, "uniform", seed=0)  # layers 0 and 3 of 4
    assert small.config.num_hidden_layers == 2
    big = model.state_dict()
    for j, i in enumerate([0, 3]):
        for name, value in small.bert.encoder.layer[j].state_dict().items():
            assert torch.equal(value, big[f"bert.encoder.layer.{i}.{name}"])
    assert torch.equal(small.classifier.weight, model.classifier.weight)
    assert torch.equal(small.bert.embeddings.word_embeddings.weight, model.bert.embeddings.word_embeddings.weight)
    fresh = shrink(model, 2, "random", seed=0)
    assert not torch.equal(fresh.bert.embeddings.word_embeddings.weight, model.bert.embeddings.word_embeddings.weight)


def test_head_is_fresh_and_seeded(tiny_model):
    a = load_pretrained(str(tiny_model), 2, seed=1)
    b = load_pretrained(str(tiny_model), 2, seed=1)
    c = load_pretrained(str(tiny_model), 3, seed=1)
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert c.classifier.weight.shape[0] == 3


def test_saved_model_loads_with_transformers(tiny_model, tmp_path):
    model = shrink(load_pretrained(str(tiny_model), 2, seed=0), 2, "first", seed=0).eval()
    save_model(model, load_tokenizer(str(tiny_model)), tmp_path / "model")
    assert (tmp_path / "model" / "model.safetensors").is_file()
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model").eval()
    saved, original = loaded.state_dict(), model.state_dict()
    assert saved.keys() == original.keys()
    for name, value in original.items():  # the weights round-trip exactly
        assert torch.equal(saved[name], value), name
    x = torch.tensor([[2, 10, 11, 3]])
    # two forward passes need not agree bitwise across CPU kernels: the outputs, to a tolerance
    torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits, rtol=1e-5, atol=1e-6)
    assert load_classifier(tmp_path / "model").config.num_hidden_layers == 2
