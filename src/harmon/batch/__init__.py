"""Many prompts -> many images: resumable, shardable across processes, in the layouts of GenEval, DPG-Bench
and WISE on request (what each benchmark's official scorer reads).

``run_batch(prompts, model, out_dir, settings, options)`` (:func:`run_batch`) draws every image of a
prompts file with one :class:`~harmon.settings.GenerationSettings` (how each image is drawn, resolved for
the model before any work) and one :class:`BatchOptions` (seed, images per prompt, batch size, layout,
device); ``harmon batch`` is its command line.

Prompts (:func:`load_prompts`, in :mod:`harmon.batch.prompts`)
    a JSON list of strings or of objects with a ``"prompt"`` (other keys, e.g. GenEval's
    ``"tag"`` and ``"include"``, are kept), JSONL (one object or JSON string per line, blank
    lines skipped), or ``.txt`` (one prompt per non-blank line). ``.json`` files are read as
    JSON, ``.jsonl`` as JSONL, anything else by its first character (``[`` -> JSON list).
    The benchmarks' own files: GenEval's ``evaluation_metadata.jsonl``; DPG-Bench's folder
    ``prompts/`` of ``<item_id>.txt`` files (one prompt each, in name order); a WISE JSON file
    (objects with ``"Prompt"`` and ``"prompt_id"``).

Work items and seeds (:mod:`harmon.batch.work`)
    Prompt ``i`` (0-based, in file order) gets ``K = num_images`` images; image ``k`` of it is
    work item ``j = i * K + k`` and uses seed ``S + j`` (``S = seed``). Items are cut into
    blocks of ``batch_size`` consecutive items, and block ``b`` belongs to rank
    ``b % world_size``. Each block is always generated as one batch (also when resuming a
    partly written block), so with the same ``batch_size`` every image is bit-identical
    whatever the number of ranks or interruptions. Another ``batch_size`` changes images
    only by float rounding (batch-shaped kernels; at most 1/255 on a few pixels seen on CPU).

Layout (:func:`harmon.outputs.item_paths`)
    default:   ``OUT/<i:05d>_<k:02d>.png`` + ``OUT/<i:05d>_<k:02d>.json``
    GenEval:   ``OUT/<i:05d>/metadata.jsonl`` (the prompt's original JSON object, one line),
               ``OUT/<i:05d>/samples/<k:04d>.png``, ``OUT/<i:05d>/meta/<k:04d>.json``
    DPG-Bench: ``OUT/images/<item_id>.png``: the 2x2 grid of the prompt's 4 images (image k at
               column k % 2, row k // 2), the only files there, as ``compute_dpg_bench.py
               --image-root-path OUT/images --pic-num 4 --resolution SIZE`` reads them; the images
               themselves in ``OUT/samples/<item_id>_<k>.png`` + ``OUT/meta/<item_id>_<k>.json``
    WISE:      ``OUT/images/<prompt_id>.png`` (one image per prompt, as ``gpt_eval.py --image_dir
               OUT/images`` reads it) + ``OUT/meta/<prompt_id>.json``
    plus ``OUT/run.json``: the settings of the run. The PNGs carry the metadata every generated image
    carries (:func:`harmon.outputs.image_metadata`: prompt, seed, the resolved settings under their own
    names, model) and the item's ``index`` and ``sample``.

    Per-image metadata is one sidecar JSON per image rather than one shared ``metadata.jsonl``:
    ranks never write to the same file (no interleaved or torn appends, no locks, works on
    network file systems), each record is written whole with ``os.replace``, and a record
    exists exactly when its image was finished, so resuming needs no log replay or repair.

Atomicity and resume (:mod:`harmon.batch.run`)
    Every file is written whole by :func:`harmon.files.write_atomically`. The PNG is written first, its
    sidecar second: the sidecar is the commit record. An image counts as done when its sidecar parses
    and names the same prompt, seed and run settings, and its PNG exists and ends with PNG's ``IEND``
    chunk; everything else is (re)generated. A killed run so loses only the images in flight; the stale
    temporary files it leaves are removed by whichever rank owns those images in the next run.
    ``run.json`` is created once (no-clobber, via a hard link) and compared field by field on every later
    run: other settings (model, prompts, seed, images per prompt, any generation setting, dtype, layout)
    are refused with :class:`RunMismatchError` instead of mixing outputs. The batch size, device,
    compilation and number of ranks are not settings and may change between runs.

Sharding
    Under ``torchrun --nproc_per_node N`` the ranks read ``RANK``, ``WORLD_SIZE`` and
    ``LOCAL_RANK`` from the environment (:func:`shard_from_env`; without them: rank 0 of 1). No
    collectives are needed, so ``torch.distributed`` is never initialised. On CUDA rank r uses
    ``cuda:LOCAL_RANK``. Run one command (one set of ranks) per output folder at a time.
"""
from .options import BatchError, BatchOptions, Shard, shard_from_env
from .prompts import PromptFileError, PromptRecord, load_prompts, parse_prompts
from .run import (RUN_FILE, RUN_FORMAT, BatchSummary, RunMismatchError, check_run_file, model_fingerprint,
                  prompts_digest, run_batch)
from .work import Item, blocks_for_rank, item_done, work_items

__all__ = ["RUN_FILE", "RUN_FORMAT", "BatchError", "BatchOptions", "BatchSummary", "Item", "PromptFileError",
           "PromptRecord", "RunMismatchError", "Shard", "blocks_for_rank", "check_run_file", "item_done",
           "load_prompts", "model_fingerprint", "parse_prompts", "prompts_digest", "run_batch", "shard_from_env",
           "work_items"]
