"""Sampling: one jitted lax.scan sampler with a KV cache (`sampler`), guidance schedules
(`guidance`), temperature / top-k / top-p (`filtering`), the GPT step (`gpt_step`) and sharded,
resumable generation to ADM npz + PNG grids (`generate`)."""
