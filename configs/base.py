"""DistilBERT as in the paper: bert-base-uncased -> 6 layers, triple loss, batches of 4K.

    python -m distil_jax.main --config=configs/base.py --workdir=gs://BUCKET/distilbert

Teacher `bert-base-uncased` (a Hugging Face directory, or the hub name where there is
a network); student of 6 layers of width 768 initialised from teacher layers
0, 2, 4, 7, 9, 11; sequences of up to 512 tokens from English Wikipedia + BookCorpus
(TFDS); 3 epochs; effective batches of 4096 sequences by gradient accumulation;
lr 5e-4 with 5% linear warmup and linear decay; AdamW (0.9, 0.98), eps 1e-6, no weight
decay, gradient clipping 5.0; T = 2, alpha_ce 5, alpha_mlm 2, alpha_cos 1 (the
reference README's command). Dynamic masking, no next-sentence objective.

Sized for a TPU v4-32 or 8 x A100/H100 (pure data parallel, micro-batches of 32
sequences per device step); the paper used 8 x 16 GB V100 for about 90 hours. Expect a
student with 97% of BERT-base's GLUE score: macro 77.0 vs 79.5 in the paper (Table 1).
"""

from distil_jax.config import defaults


def get_config():
    c = defaults()  # the defaults are the paper's recipe
    c.mode = "distill"
    c.teacher.path = "bert-base-uncased"
    c.student.num_layers = 6
    c.data.source = "corpus"
    c.data.seq_len = 512
    # English Wikipedia + Toronto BookCorpus, each once per epoch; 1% of each held out.
    # Both are read with tfds.data_source from data_dir (a local path or gs:// bucket)
    # where they were prepared beforehand with `tfds build`.
    c.data.sources = {
        "wikipedia": {"kind": "tfds", "name": "wikipedia/20230601.en", "split": "train[:99%]",
                      "eval_split": "train[99%:]", "data_dir": "", "text_key": "text", "weight": 1.0},
        "bookcorpus": {"kind": "tfds", "name": "huggingface:bookcorpus", "split": "train[:99%]",
                       "eval_split": "train[99%:]", "data_dir": "", "text_key": "text", "weight": 1.0},
    }
    c.data.length_buckets = (128, 256, 384, 512)  # four shapes: four compilations at most
    c.train.update(steps=0, epochs=3, batch_size=4096, micro_batch_size=256)
    c.checkpoint.every_steps = 250
    return c
