"""The sandbox model: a trained tiny LLaDA-V (scripts/train_tiny.py) shipped with the project.

Same family, layout and loader as `model=tiny` / `model=llada_v`; the checkpoint lives in
dvlm_exp/assets/sandbox (safetensors + config + compact tokenizer) and is what `python run.py`
evaluates by default on the held-out synthetic shapes task (conf/model/sandbox.yaml,
conf/task/synth_shapes.yaml).
"""

from __future__ import annotations

# Dims (vocab_size comes from the compact tokenizer: 512 BPE + the 269 LLaDA added tokens).
SANDBOX_SPEC = dict(
    hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
    intermediate_size=384, vision_hidden_size=96, vision_layers=2, vision_heads=4,
    vision_intermediate_size=192, image_size=112, patch_size=14, max_shard_size="16MB",
)
# Relative to the repository root.
SANDBOX_PATH = "dvlm_exp/assets/sandbox"
# Generation preset of the task (conf/task/synth_shapes.yaml mirrors it): a one- or two-word answer
# then <|eot_id|>; one slot unmasked per step.
GEN_PRESET = dict(gen_length=4, block_length=4, steps=4, temperature=0.0, remasking="low_confidence",
                  think=None, stop=["<|eot_id|>"], strip_period=True)
