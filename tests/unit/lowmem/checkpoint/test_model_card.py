"""The model card next to an export: YAML front matter that huggingface_hub parses, the run's facts in the body."""
from huggingface_hub import ModelCard

from lowmem.checkpoint.model_card import model_card_text, write_model_card
from lowmem.config import LowMemConfig


def test_card_front_matter_parses_and_keeps_local_paths_out_of_hub_keys(tmp_path):
    local = tmp_path / "my-data.jsonl"
    local.write_text("{}\n")
    path = write_model_card(tmp_path, base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
                            datasets=[str(local), "HuggingFaceH4/ultrachat_200k"], steps=120,
                            method=LowMemConfig(rank=64, lr=2e-5), eval_loss=1.5)
    card = ModelCard.load(path)
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and "lowmem" in data["tags"]
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data["datasets"] == ["HuggingFaceH4/ultrachat_200k"]          # the local file is in the body only
    assert "| optimizer steps | 120 |" in card.text and str(local) in card.text
    assert "| final eval loss | 1.5000 (perplexity 4.48) |" in card.text
    assert "| rank | 64 |" in card.text and "| lr | 2e-05 |" in card.text


def test_card_without_hub_ids_or_eval(tmp_path):
    text = model_card_text(base_model=str(tmp_path), datasets=[], steps=3, eval_loss=float("nan"))
    card = ModelCard(text)
    assert "base_model" not in card.data.to_dict() and "datasets" not in card.data.to_dict()
    assert "| final eval loss | not evaluated |" in text
