#!/usr/bin/env bash
# MACER against Cohen et al. on Fashion-MNIST (LeNet) at sigma 0.25, 0.5 and 1.0, 10 epochs each.
# - Training: the same 10 epochs for every model, lr 0.01 decayed x0.1 after epochs 5 and 9 (the
#   paper's 200 and 400 of 440, compressed), batch 64, gradient norm clipped at 5, all 60,000
#   training images. MACER: k = 16, lambda = 16, gamma = 8, beta = 16. Cohen: k = 1, lambda = 0.
# - Certification: the same 250 test images (every 40th) for every model, Hard-RS with n0 = 100,
#   n = 100,000, alpha = 0.001 (radius caps 0.95, 1.90, 3.80), in fp32 (on a CPU whose bf16 is
#   slower than its fp32, bench.py row 3e); Soft-RS (Hoeffding, Bernstein) for MACER at
#   sigma 0.5 (Bernstein on every 80th test image, Hoeffding on every 160th); then the paired
#   comparisons and the plot.
# Every 80th image is certified first for all six models, then every 40th fills in between, so an
# interrupted run still has evenly spaced images for every model. Every step resumes where it
# stopped: rerun the script after an interruption. Two pipelines run side by side, one thread each.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
OUT=results/e10
mkdir -p $OUT
train() {  # METHOD SIGMA
  local dir=$OUT/$1_s$2
  local resume=""; [ -e $dir/checkpoint.pt ] && resume="--resume"
  python train.py --dataset fashion-mnist --method $1 --sigma $2 --epochs 10 --milestones 5 9 --train-subset 0 \
    --grad-clip 5 --cert-max 0 --save-every 1 --out-dir $dir $resume
}
certify() {  # SKIP MAX METHOD SIGMA [BOUND]
  python certify.py $OUT/$3_s$4/checkpoint.pt --n0 100 --n 100000 --alpha 0.001 --skip $1 --max $2 --seed 0 --fp32 \
    --bound ${5:-clopper-pearson} --summary $OUT/summary.json --name $3_s$4${5:+_$5}
}
(
  train macer 0.25; train cohen 0.25; train cohen 0.5; train cohen 1.0
  for s in 0.25 0.5 1.0; do certify 80 125 cohen $s; done; certify 80 125 macer 0.25
  for s in 0.25 0.5 1.0; do certify 40 250 cohen $s; done
) >> $OUT/log_a.txt 2>&1 &
(
  train macer 0.5; train macer 1.0
  certify 80 125 macer 0.5; certify 80 125 macer 1.0
  certify 80 125 macer 0.5 bernstein; certify 160 63 macer 0.5 hoeffding
  for s in 0.25 0.5 1.0; do certify 40 250 macer $s; done
) >> $OUT/log_b.txt 2>&1 &
wait
for s in 0.25 0.5 1.0; do
  python certify.py --compare $OUT/cohen_s$s/checkpoint_clopper-pearson_n100000.tsv \
    $OUT/macer_s$s/checkpoint_clopper-pearson_n100000.tsv > $OUT/compare_s$s.txt
done
for b in bernstein hoeffding; do  # Soft-RS against Hard-RS, the same model and images
  python certify.py --compare $OUT/macer_s0.5/checkpoint_clopper-pearson_n100000.tsv \
    $OUT/macer_s0.5/checkpoint_${b}_n100000.tsv > $OUT/compare_s0.5_hard_$b.txt
done
# Every row is there now: this samples nothing, it only draws summary.png, one panel per sigma.
python certify.py $OUT/macer_s0.25/checkpoint.pt --n0 100 --n 100000 --alpha 0.001 --skip 40 --max 250 --seed 0 \
  --fp32 --summary $OUT/summary.json --name macer_s0.25 --plot
