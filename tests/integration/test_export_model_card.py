"""`launch.finetune`'s export is a Hub-ready model repository: the files push_to_hub / upload_folder publish, with a
model card whose front matter huggingface_hub parses and whose body records the run."""
import json

from huggingface_hub import ModelCard

from launch.finetune import main
from lowmem.checkpoint.store import list_checkpoints


def test_export_directory_is_a_model_repository(tiny_args, tmp_path):
    assert main(tiny_args + ["max_steps=3", "eval_every=0"]) == 0
    model_dir = tmp_path / "run" / "model"
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= names
    assert not [n for n in names if n.startswith(".")]            # nothing hidden left for an upload to pick up
    card = ModelCard.load(model_dir / "README.md")
    assert card.data.to_dict()["library_name"] == "transformers"
    evals = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    final = [r["eval_loss"] for r in evals if r["kind"] == "eval"][-1]
    assert f"| final eval loss | {final:.4f}" in card.text and "| optimizer steps | 3 |" in card.text
    assert "train.jsonl" in card.text and "| rank | 16 |" in card.text

    # The export subcommand writes a card too (its steps from the checkpoint; no evaluation there).
    ckpt = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    assert main(["export", str(ckpt), str(tmp_path / "again")]) == 0
    again = ModelCard.load(tmp_path / "again" / "README.md")
    assert "| optimizer steps | 3 |" in again.text and "not evaluated" in again.text
