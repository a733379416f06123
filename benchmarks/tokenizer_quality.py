"""Tiny tokenizers trained on the offline Fashion-MNIST for a few minutes of CPU: reconstruction quality.

    python benchmarks/tokenizer_quality.py [--variants=tiny_single256,tiny_dual] [--steps=N]

Trains each variant of configs/tokenizer.py from scratch on the Fashion-MNIST train split (Debian
package `dataset-fashion-mnist`), then reports PSNR / SSIM / codebook usage on held-out test images.
Targets (issue 3): the single codebook reaches PSNR >= 22 dB with usage >= 80 %; the IAR2 dual
codebook (256 semantic + detail codes) beats the single 256-code codebook of the same model.
The last stdout line is one JSON object; `psnr`, `ssim`, `usage` are the single codebook's.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import emit  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="tiny_single256,tiny_dual",
                    help="comma-separated configs/tokenizer.py variants; the first single one is 'the single codebook'")
    ap.add_argument("--steps", type=int, default=0, help="training steps per variant (0: the config's)")
    ap.add_argument("--eval_images", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grid_dir", default="", help="write <variant>.png (originals | reconstructions) here")
    args = ap.parse_args()

    import jax
    from absl import logging

    from iar_jax.config_lib import load_config
    from iar_jax.tokenizer import training

    logging.set_verbosity(logging.WARNING)
    out = {"device": jax.devices()[0].device_kind, "variants": {}}
    train_images = eval_images = None
    t_all = time.time()
    for v in [s for s in args.variants.split(",") if s]:
        config = load_config(f"configs/tokenizer.py:{v}")
        config.train.seed = args.seed
        if train_images is None:
            train_images = training.make_image_source(config, config.data.split)
            eval_images = training.make_image_source(config, config.data.eval_split, args.eval_images)
        t0 = time.time()
        cpu0 = time.process_time()

        def log(step, m, v=v, t0=t0):
            keys = ("loss", "rec_loss", "usage", "usage2")
            print(f"  {v} step {step}: " + ", ".join(f"{k} {m[k]:.4g}" for k in keys if k in m)
                  + f" ({time.time() - t0:.0f}s)", flush=True)

        trainer, state, res = training.train_and_evaluate(config, None, images=train_images, eval_images=eval_images,
                                                      num_steps=args.steps or None, log_fn=log)
        if args.grid_dir:
            import numpy as np

            from iar_jax.evaluation import reconstruction

            recon = training.make_reconstruct_fn(trainer.model, "dual" if trainer.model_cfg.dual else None)(
                jax.device_get(state["params"]), eval_images[:16])[0]
            reconstruction.save_reconstruction_grid(os.path.join(args.grid_dir, f"{v}.png"), eval_images[:16],
                                                   np.asarray(recon))
        res = {k: round(float(x), 4) for k, x in res.items()}
        res.update(steps=int(args.steps or config.train.num_steps), batch=int(config.train.global_batch),
                   codebook=list(trainer.model_cfg.vocab_sizes), seconds=round(time.time() - t0, 1),
                   cpu_seconds=round(time.process_time() - cpu0, 1))
        out["variants"][v] = res
        print(f"{v}: {res}", flush=True)

    singles = [v for v in out["variants"] if not v.endswith("dual")]
    if singles:
        s = out["variants"][singles[0]]
        out.update(psnr=s["psnr"], ssim=s["ssim"], usage=s["usage"], single_variant=singles[0])
        out["single_targets_met"] = bool(s["psnr"] >= 22.0 and s["usage"] >= 0.8)
    if "tiny_dual" in out["variants"] and "tiny_single256" in out["variants"]:
        d, s = out["variants"]["tiny_dual"], out["variants"]["tiny_single256"]
        out["dual_psnr"] = d["psnr"]
        out["dual_minus_single256_psnr"] = round(d["psnr"] - s["psnr"], 4)
        out["dual_beats_single256"] = bool(d["psnr"] > s["psnr"])
    out["total_seconds"] = round(time.time() - t_all, 1)
    emit(out)


if __name__ == "__main__":
    main()
