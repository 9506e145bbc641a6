"""Builds a tiny random-weight model and tokenizer with a fixed seed (no model hub needed).

--arch picks the KV layout: llama (the default; K and V per layer), qwen2 (the same with biases),
gemma3 (a sliding-window layer and a full-attention one), deepseek_v2 (MLA: one latent tensor
per layer; vLLM's MLA wants a latent of 512 + 64 rope dims, so it is larger).

usage: python make_model.py DIR [--arch A --layers N --hidden H --heads A --kv-heads K --vocab V]
"""

import argparse
import os


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=0)
    ap.add_argument("--arch", default="llama", choices=["llama", "qwen2", "gemma3", "deepseek_v2"])
    a = ap.parse_args()
    if os.path.exists(os.path.join(a.dir, "config.json")):
        return
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    os.makedirs(a.dir, exist_ok=True)
    words = ["alpha", "beta", "gamma", "delta", "cache", "block", "token", "prefix", "node", "tier"]
    text = [" ".join(words[(i * 7 + j * 3) % len(words)] + str(j % 13) for j in range(64)) for i in range(400)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=a.vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(a.dir)
    torch.manual_seed(0)
    common = dict(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate or a.hidden * 2,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        max_position_embeddings=8192,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="float32",
    )
    model(a, common).save_pretrained(a.dir)


def model(a, common):
    """The random model of architecture `a.arch`."""
    import transformers as t

    if a.arch == "llama":
        return t.LlamaForCausalLM(t.LlamaConfig(num_key_value_heads=a.kv_heads, **common))
    if a.arch == "qwen2":
        return t.Qwen2ForCausalLM(t.Qwen2Config(num_key_value_heads=a.kv_heads, **common))
    if a.arch == "gemma3":
        # Alternating sliding-window (64 tokens) and full-attention layers.
        kinds = ["sliding_attention", "full_attention"] * a.layers
        cfg = t.Gemma3TextConfig(num_key_value_heads=a.kv_heads, head_dim=a.hidden // a.heads, sliding_window=64,
                                 layer_types=kinds[: a.layers], pad_token_id=0, **common)
        return t.Gemma3ForCausalLM(cfg)
    # DeepSeek-V2 with MLA (kv_lora_rank 512 + rope 64: the latent sizes vLLM's MLA supports), dense
    # layers only.
    cfg = t.DeepseekV2Config(num_key_value_heads=a.heads, kv_lora_rank=512, q_lora_rank=None,
                             qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32,
                             first_k_dense_replace=a.layers, n_routed_experts=4, num_experts_per_tok=2,
                             moe_intermediate_size=64, n_shared_experts=1, **common)
    return t.DeepseekV2ForCausalLM(cfg)

if __name__ == "__main__":
    main()
