"""DistilBERT as in the paper: bert-base-uncased -> 6 layers, triple loss, batches of 4K.

    python -m distil_jax.main --config=configs/base.py --workdir=gs://BUCKET/distilbert --config.mode=prepare
    python -m distil_jax.main --config=configs/base.py --workdir=gs://BUCKET/distilbert

The first command prepares the corpus once into gs://BUCKET/distilbert/data (a Beam
pipeline: one worker per core here, or Dataflow with data.beam_options); the second
trains on every host of the slice, each reading its rows from there. The corpora are
streamed from the Hugging Face hub; `--config=configs/base.py:DIR` reads Parquet copies
under DIR instead (DIR/wikipedia/20231101.en/*.parquet, DIR/bookcorpus/**/*.parquet).

Teacher `bert-base-uncased` (a Hugging Face directory, or the hub name where there is
a network); student of 6 layers of width 768 initialised from teacher layers
0, 2, 4, 7, 9, 11; sequences of up to 512 tokens from English Wikipedia + BookCorpus
(the hub's Parquet, BookCorpus's sentences packed into running text); 3 epochs;
effective batches of 4096 sequences by gradient accumulation;
lr 5e-4 with 5% linear warmup and linear decay; AdamW (0.9, 0.98), eps 1e-6, no weight
decay, gradient clipping 5.0; T = 2, alpha_ce 5, alpha_mlm 2, alpha_cos 1 (the
reference README's command). Dynamic masking, no next-sentence objective.

Sized for a TPU v4-32 or 8 x A100/H100 (pure data parallel, micro-batches of 32
sequences per device step); the paper used 8 x 16 GB V100 for about 90 hours. Expect a
student with 97% of BERT-base's GLUE score: macro 77.0 vs 79.5 in the paper (Table 1).
"""

from distil_jax.config import defaults


def get_config(corpora: str = ""):
    c = defaults()  # the defaults are the paper's recipe
    c.mode = "distill"
    c.teacher.path = "bert-base-uncased"
    c.student.num_layers = 6
    c.data.source = "corpus"
    c.data.seq_len = 512
    # English Wikipedia + Toronto BookCorpus, each once per epoch, 1% of each held out (by
    # content hash; BookCorpus by block of sentences), as people obtain them today: the
    # Hugging Face hub's datasets, streamed by `datasets` where there is a network, or
    # (`--config=configs/base.py:DIR`) Parquet copies of them under DIR, local or gs://
    # (README "Data" gives the download commands). Prepare once, then train.
    c.data.sources = {
        # 6.4M articles, one row each (columns id, url, title, text).
        "wikipedia": ({"kind": "datasets", "path": "wikimedia/wikipedia", "name": "20231101.en", "split": "train"}
                      if not corpora else
                      {"kind": "parquet", "files": f"{corpora}/wikipedia/20231101.en/*.parquet"})
                     | {"text_key": "text", "eval_percent": 1, "weight": 1.0},
        # 74M rows of one sentence each: packed into running text of up to seq_len - 2 tokens.
        "bookcorpus": ({"kind": "datasets", "path": "bookcorpus/bookcorpus", "revision": "refs/convert/parquet",
                        "split": "train"} if not corpora else
                       {"kind": "parquet", "files": f"{corpora}/bookcorpus/**/*.parquet"})
                      | {"text_key": "text", "pack": True, "eval_percent": 1, "weight": 1.0},
    }
    c.data.length_buckets = (128, 256, 384, 512)  # four shapes: four compilations at most
    c.train.update(steps=0, epochs=3, batch_size=4096, micro_batch_size=256)
    c.checkpoint.every_steps = 250
    return c
