"""Builds a tiny random LoRA adapter (PEFT's file layout, no `peft` needed) for the model of
`make_model.py`, with a fixed seed: rank 8 on every layer's q_proj and v_proj, scaled so that its
outputs differ from the base model's.

usage: python make_lora.py MODEL_DIR ADAPTER_DIR [--seed N]
"""

import argparse
import json
import os


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("dir")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rank", type=int, default=8)
    a = ap.parse_args()
    if os.path.exists(os.path.join(a.dir, "adapter_config.json")):
        return
    import torch
    from safetensors.torch import save_file

    with open(os.path.join(a.model, "config.json")) as f:
        cfg = json.load(f)
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    head_dim = hidden // cfg["num_attention_heads"]
    outs = {"q_proj": hidden, "v_proj": cfg["num_key_value_heads"] * head_dim}
    torch.manual_seed(a.seed)
    tensors = {}
    for layer in range(layers):
        for module, out in outs.items():
            name = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{name}.lora_A.weight"] = torch.randn(a.rank, hidden) * 0.5
            tensors[f"{name}.lora_B.weight"] = torch.randn(out, a.rank) * 0.5
    os.makedirs(a.dir, exist_ok=True)
    save_file(tensors, os.path.join(a.dir, "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": os.path.abspath(a.model),
        "r": a.rank,
        "lora_alpha": 2 * a.rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted(outs),
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    }
    with open(os.path.join(a.dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


if __name__ == "__main__":
    main()
