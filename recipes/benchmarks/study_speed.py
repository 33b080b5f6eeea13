"""One speed measurement of a CTranslate2 model, in a process of its own (the study's speed stage).

    python recipes/benchmarks/study_speed.py MODEL_DIR SOURCE_FILE SENTENCES

Translates the first SENTENCES lines of SOURCE_FILE with beam 4 on 2 threads after a warm-up
batch and prints {"sentences_per_second": ...} as the last line. A process per measurement:
torch and CTranslate2 bundle their own thread pools, which slow each other in one process.
"""

import json
import sys
import time

from nmt_lightning.deploy import CTranslate2Model
from nmt_lightning.evaluation import read_lines

if __name__ == "__main__":
    directory, source, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    lines = read_lines(source)[:count]
    model = CTranslate2Model(directory, threads=2)
    model.translate_lines(lines[:32], beam=4, progress=False)  # warm-up
    started = time.perf_counter()
    model.translate_lines(lines, beam=4, progress=False)
    print(json.dumps({"sentences_per_second": len(lines) / (time.perf_counter() - started)}))
