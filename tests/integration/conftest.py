"""Fixtures for driving `launch.finetune`: a tokenizer trained in the test, a tiny LLaMA config.json (trained from
scratch) and small JSONL data sets, so a whole run takes seconds."""
import json

import pytest

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a stitch in time saves nine and a penny saved is a penny earned",
    "to be or not to be that is the question",
    "all that glitters is not gold and all who wander are not lost",
    "the rain in spain stays mainly in the plain",
    "early to bed and early to rise makes a man healthy wealthy and wise",
]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {% if m['role'] == 'assistant' %}"
                          "{% generation %}{{ m['content'] }}</s>{% endgeneration %}{% else %}{{ m['content'] }}"
                          "</s>{% endif %}{% endfor %}")
    out = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_config(tmp_path_factory):
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 64, "vocab_size": 300, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
    path = tmp_path_factory.mktemp("model") / "config.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    with open(path, "w") as f:
        for i in range(120):
            f.write(json.dumps({"text": " ".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(3))}) + "\n")
    return path


@pytest.fixture
def tiny_args(tiny_tokenizer_dir, tiny_model_config, tiny_data, tmp_path):
    """argv for a fast from-scratch run; extend with overrides."""
    return [f"model={tiny_model_config}", f"tokenizer={tiny_tokenizer_dir}", f"data.path={tiny_data}",
            f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}", "seq_len=32",
            "micro_batch_size=4", "max_steps=12", "eval_every=6", "lr=3e-3", "warmup_steps=2",
            "optim.rank=16", "optim.refresh_interval_steps=4", "optim.residual_warmup_steps=3",
            "optim.weight_block_size=64"]
