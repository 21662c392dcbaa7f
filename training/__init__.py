"""Training: Axolotl config generation (full / LoRA / QLoRA, sweeps, multi-GPU), strict config
checks on top of Axolotl's own schema, the VRAM planner, and the launcher."""

# Version of the generated-config format; part of every header, so a change shows in the diff test.
__version__ = "config-format 1"
