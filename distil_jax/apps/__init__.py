"""What runs on trained models, each started from main.py by config.mode.

evaluate (held-out MLM metrics on fixed masks, paired comparisons), export (a checkpoint
as a Hugging Face directory), finetune (a downstream task), demo (the embedded default
end to end), ablate (the paper's Table 4 at small scale), shapes (students of another
shape: layer-pair terms and pruning, at small scale), deploy (the demo's models in ONNX
Runtime, fp32 and int8, scored); stages.py holds what the demo-based modes share. Each
mode has `run(config, workdir) -> dict` and reads models through `checkpoint.load_model` or
`hf.load_hf_model`: none builds an optimizer, a teacher or a train loader to read weights.
"""
