"""Files that ship inside the package (package data, so `pip install .` carries them).

`demo_teacher/`: the embedded demo's teacher, pretrained by this project on the embedded
corpus (configs/demo_teacher.py), as a Hugging Face directory in bfloat16 with its
tokenizer and a card (README.md) that says how it was made and what it scores.
"""

import os

DEMO_TEACHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_teacher")
