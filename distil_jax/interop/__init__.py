"""Other ecosystems: Hugging Face checkpoints in and out (hf.py for the encoders and MLM
heads, hf_heads.py for the task heads) and ONNX / int8 export (onnx_export.py)."""
