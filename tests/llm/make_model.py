"""Writes a tiny llama model in GGUF for the LLM tests: float32, 2 layers, width 64, 4 heads, feed-forward 128, a
GPT-2 byte-level tokenizer and a ChatML chat template. The weights are random (fixed seed, so the file is the same
on every run) with the output layer biased towards printable ASCII: every sampled token is one valid UTF-8
character, so a streamed reply comes token by token and runs to max_tokens.

    python make_model.py OUT.gguf

Needs the `gguf` package (and numpy, which it brings).
"""

import sys

import numpy as np
from gguf import GGUFWriter, TokenType

SEED = 20240601
LAYERS = 2
WIDTH = 64
HEADS = 4
FEED_FORWARD = 128
CONTEXT = 2048

# A few merges: the gpt2 tokenizer refuses a vocabulary without any. Each one's result is a token too.
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("o", "n"), ("Ġ", "a")]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def bytes_to_unicode():
    """GPT-2's map from each byte to the printable character that stands for it in the vocabulary."""
    visible = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    visible += list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in visible}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def main(out):
    rng = np.random.default_rng(SEED)
    byte_chars = bytes_to_unicode()
    tokens = [byte_chars[b] for b in range(256)] + [a + b for a, b in MERGES] + SPECIALS
    types = [TokenType.NORMAL] * (len(tokens) - len(SPECIALS)) + [TokenType.CONTROL] * len(SPECIALS)
    vocab = len(tokens)
    endoftext, im_end = tokens.index("<|endoftext|>"), tokens.index("<|im_end|>")

    w = GGUFWriter(out, "llama")
    w.add_name("wsgate-tiny")
    w.add_context_length(CONTEXT)
    w.add_embedding_length(WIDTH)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FEED_FORWARD)
    w.add_head_count(HEADS)
    w.add_head_count_kv(HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(WIDTH // HEADS)
    w.add_file_type(0)  # all float32

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([f"{a} {b}" for a, b in MERGES])
    w.add_bos_token_id(endoftext)
    w.add_eos_token_id(im_end)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    def normal(*shape, scale):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    # Dimension 0 of every embedding is a constant that the small blocks barely disturb: after the final norm it
    # is large and positive, so column 0 of the output layer acts as a per-token bias.
    embd = normal(vocab, WIDTH, scale=0.1)
    embd[:, 0] = 1.0
    w.add_tensor("token_embd.weight", embd)
    for i in range(LAYERS):
        for part in ("q", "k", "v", "output"):
            w.add_tensor(f"blk.{i}.attn_{part}.weight", normal(WIDTH, WIDTH, scale=0.02))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(WIDTH, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", normal(FEED_FORWARD, WIDTH, scale=0.02))
        w.add_tensor(f"blk.{i}.ffn_up.weight", normal(FEED_FORWARD, WIDTH, scale=0.02))
        w.add_tensor(f"blk.{i}.ffn_down.weight", normal(WIDTH, FEED_FORWARD, scale=0.02))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(WIDTH, dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(WIDTH, dtype=np.float32))

    # Printable ASCII (the byte tokens for space to '~' and the merged ones) keep a zero bias; every other token,
    # the bytes that could start an invalid UTF-8 sequence and the specials that would end the reply, gets a large
    # negative one.
    output = normal(vocab, WIDTH, scale=0.5)
    printable = np.zeros(vocab, dtype=bool)
    printable[ord(" ") : ord("~") + 1] = True
    printable[256 : 256 + len(MERGES)] = True
    output[:, 0] = np.where(printable, 0.0, -5.0)
    w.add_tensor("output.weight", output)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python make_model.py OUT.gguf")
    main(sys.argv[1])
