"""The inference side of sdtune: load a base, put adapters on it, make images, read and write adapter files.

Base loading, sampling, contact sheets, the toy world and its scorer, the `adapter.json` manifest, and the adapter
formats (kohya/A1111 keys, single-file SD checkpoints) as pure dict->dict functions. Nothing here imports
`sdtune.trainers` or `sdtune.studio` (tests/test_layout.py holds that).
"""

import logging

# Library notices that say nothing to an sdtune user: bitsandbytes looks for an optional CPU 4-bit kernel package,
# and transformers falls back from torchvision (which has no CPU wheel here) to PIL for an image processor that
# sdtune never calls. Real warnings from these libraries still show.
for _name in ("bitsandbytes.backends.cpu.ops", "transformers.utils.import_utils"):
    logging.getLogger(_name).setLevel(logging.ERROR)


def quiet_libraries():
    """For sdtune's entry points: keep diffusers/transformers to errors and drop their per-file loading bars.

    Training and sampling print their own progress; a user should see the preflight, the step bar and real
    problems, not "Loading pipeline components" bars or notices about adapters we deliberately did not train.
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def skip_the_final_collection():
    """For sdtune's entry points (the trainers, the `sdtune` CLI): at exit, freeze the heap instead of letting Python
    walk it in a last garbage collection.

    torch, diffusers, transformers and peft leave millions of objects; the final collection over them took 1.8-2.4 s
    per process on the 2-core CI machine (importing peft alone, measured 2026-12-07), paid by every trainer and CLI
    call, after its work is done. Done from `atexit`, so it runs after the work and after the other exit hooks that
    flush files (trackers), and an entry point called inside a longer process (tests) freezes nothing until that
    process ends. Objects are still released by reference counting as modules are torn down.
    """
    import atexit
    import gc

    atexit.unregister(gc.freeze)  # once per process, however often an entry point runs
    atexit.register(gc.freeze)
