#!/usr/bin/env bash
# The main job on the embedded corpus: prepare LibreOffice help en-cs, train the tiny
# Transformer on CPU (recipes/libreoffice_en_cs/tiny.yaml), translate the test split with
# beam 4 and print BLEU/chrF with sacrebleu signatures; then fine-tune it with 8-bit
# quantization-aware training, export the int8 model and print fp32 / int8 side by side.
#   bash recipes/libreoffice_en_cs/main_job.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=data/libreoffice_en_cs
RUN=runs/libreoffice_en_cs_tiny
INT8=runs/int8_benchmark

# A second run trains a new model: the first run's checkpoints and benchmark files move to
# runs/previous/<time>/ (else the old run's best-BLEU checkpoints would sit beside the new
# ones, and the cached fine-tuned models would belong to the old model).
if [ -e "$RUN" ] || [ -e "$INT8" ]; then
    PREVIOUS="runs/previous/$(date +%Y%m%d-%H%M%S)"
    mkdir -p "$PREVIOUS"
    for dir in "$RUN" "$INT8"; do
        if [ -e "$dir" ]; then mv "$dir" "$PREVIOUS/"; fi
    done
    echo "main job: the previous run's files are now in $PREVIOUS"
fi

nmt-lightning prepare --corpus libreoffice --src en --tgt cs --out "$DATA"
nmt-lightning fit --config recipes/libreoffice_en_cs/tiny.yaml
nmt-lightning translate --checkpoint "$RUN/checkpoints/last.ckpt" --beam 4 \
    --input "$DATA/test.en" --output "$RUN/test.hyp.cs" --ref "$DATA/test.cs"
echo "hypotheses: $RUN/test.hyp.cs (check: sacrebleu $DATA/test.cs -i $RUN/test.hyp.cs -m bleu chrf)"
# QAT fine-tuning (finetune.yaml + compress/qat.yaml through the CLI), int8 export, and the
# fp32 / post-training int8 / QAT int8 table: BLEU, chrF, bytes on disk, CPU sentences/s.
python recipes/benchmarks/int8_quantization.py --out "$INT8" --data-dir "$DATA" \
    --fp32-checkpoint "$RUN/checkpoints/last.ckpt" --speed-rounds 2
