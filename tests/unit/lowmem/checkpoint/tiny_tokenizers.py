"""Tokenizers trained in the test process (no downloads): byte-level BPE (GPT-2 style) and SentencePiece-style BPE
with byte fallback (Llama 2 style), each with special tokens and a chat template."""
import json

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SENTENCES = ["the quick brown fox jumps over the lazy dog", "to be or not to be that is the question",
             "all that glitters is not gold", "early to bed and early to rise"]
TEXT = "the lazy fox: to be, or not? Ünïcödé 42"
CHAT_TEMPLATE = ("{% for m in messages %}{{ bos_token }}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}"
                 "{% endfor %}")


def byte_level_tokenizer(pre_tokenizer=None):
    """pre_tokenizer: a tokenizers pre-tokenizer (default GPT-2's ByteLevel with its regex)."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def sentencepiece_tokenizer():
    """transformers' LlamaTokenizer over a BPE vocabulary with byte fallback ("▁" for spaces, <0xNN> pieces)."""
    from transformers import LlamaTokenizer

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(SENTENCES * 20, trainers.BpeTrainer(vocab_size=300, special_tokens=specials))
    spec = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["merges"]]
    llama = LlamaTokenizer(vocab=spec["vocab"], merges=merges)
    llama.chat_template = CHAT_TEMPLATE
    return llama
