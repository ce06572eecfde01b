"""Checks of params.yaml against the prepared data, before any long work starts.

`config.load_params` validates params.yaml on its own (keys, types, ranges,
algorithm names). Some mistakes only show against the data: an N-way larger
than the classes a split has, or K + Q larger than the images of its smallest
class. Without this check they surface minutes into a run, deep inside an
episode sampler; here every configured episode set and the meta-training
episode shape of every source are checked from the manifests alone (no images
are read), after the `min_images_per_class` exclusions, and all problems are
reported at once, each naming its params key and the values that would work.
A `finetune.min_images_per_class` that a target's class falls under is
refused here too, and so is every use that needs labels (an episode set, a
meta-training or pre-training source, a fine-tuned target) of a dataset
prepared without any (an image folder without class sub-folders): such a
dataset can only be a `finetune.unlabeled` target.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from metatransfer.config import Params
from metatransfer.data.store import MANIFEST_FILE, SPLIT_ORDER, has_labels, load_manifest
from metatransfer.errors import ConfigError
from metatransfer.episodes import N_ROTATIONS


@dataclass(frozen=True)
class SplitShape:
    """What an episode request needs to know about one split."""

    dataset: str
    split: str
    classes: int
    min_per_class: int  # images in the smallest class
    smallest_class: str
    counts: tuple[tuple[str, int], ...] = ()  # (class name, images) of every class, by name


def split_shapes(prepared_dir: str | Path, datasets: Iterable[str]) -> dict[tuple[str, str], SplitShape]:
    """Class counts and smallest class size of every split of `datasets`, from the manifests.

    Raises:
        DataError: a dataset is not prepared (the message lists those that are).
    """
    shapes: dict[tuple[str, str], SplitShape] = {}
    for dataset in sorted(set(datasets)):
        df = load_manifest(prepared_dir, dataset, validate=False)
        for split, rows in df.groupby("split"):
            counts = rows["class"].value_counts()
            shapes[(dataset, str(split))] = SplitShape(
                dataset, str(split), int(counts.size), int(counts.min()), str(counts.idxmin()),
                tuple(sorted((str(c), int(n)) for c, n in counts.items())),
            )
    return shapes


def without_small_classes(shape: SplitShape, minimum: int) -> tuple[SplitShape, dict[str, int]]:
    """`shape` once the classes under `minimum` images are excluded (what `episodes.kept_classes` does).

    Returns:
        (the shape of the kept classes, {excluded class name: images}); the
        shape is unchanged when nothing is excluded. With every class excluded
        the shape has 0 classes and min_per_class 0.
    """
    excluded = {c: n for c, n in shape.counts if n < minimum} if minimum > 0 else {}
    if not excluded:
        return shape, {}
    kept = tuple((c, n) for c, n in shape.counts if c not in excluded)
    smallest = min(kept, key=lambda cn: (cn[1], cn[0])) if kept else ("", 0)
    return SplitShape(shape.dataset, shape.split, len(kept), smallest[1], smallest[0], kept), excluded


@dataclass(frozen=True)
class Request:
    """One N-way K-shot Q-query episode request and the params keys that set it."""

    key: str  # the section named in K+Q problems (e.g. "episodes.sets.x", "meta_train.sources[1]")
    n_way_key: str
    min_key: str
    n_way: int
    k_max: int
    n_query: int
    minimum: int
    rotation: bool
    k_key: str  # how the shot count is named ("max(shots)", "k_shot")


def _request_problems(req: Request, split_key: str, shape: SplitShape | None, where: str,
                      available_splits: list[str]) -> list[str]:
    """Problems of one request against one split (empty when it fits)."""
    if shape is None:
        return [f"{split_key}: {where} has no images; allowed: a split the dataset has "
                f"{available_splits} (or re-run `prepare` with more classes)"]
    factor = N_ROTATIONS if req.rotation else 1
    ways = shape.classes * factor
    n_way = req.n_way
    if n_way > ways:
        extra = f" ({shape.classes} classes x {N_ROTATIONS} rotations)" if req.rotation else ""
        return [f"{req.n_way_key}: {n_way} but {where} has only {ways} classes{extra}; allowed: 2..{ways}"]
    kept, excluded = without_small_classes(shape, req.minimum)
    if kept.classes * factor < n_way:
        need_classes = -(-n_way // factor)
        largest = sorted((n for _, n in shape.counts), reverse=True)
        listed = ", ".join(f"{c} ({n})" for c, n in excluded.items())
        rot = f" x {N_ROTATIONS} rotations" if req.rotation else ""
        return [f"{req.min_key}: {req.minimum} excludes {len(excluded)} of {shape.classes} classes of {where} "
                f"({listed}), leaving {kept.classes} classes{rot} but {req.n_way_key} is {n_way}; allowed: "
                f"{req.min_key} <= {largest[need_classes - 1]} (or a smaller {req.n_way_key})"]
    out = []
    need = req.k_max + req.n_query
    if need > kept.min_per_class:
        room = kept.min_per_class - req.n_query
        k_key, low = req.k_key, kept.min_per_class
        allowed = (f"{k_key} <= {room} with n_query={req.n_query}, or n_query <= {low - 1} with {k_key}=1"
                   if room >= 1 else f"n_query <= {low - 1} with {k_key}=1")
        big_enough = sum(1 for _, n in kept.counts if n >= need)
        exclude = ""
        if big_enough * factor >= n_way:
            exclude = (f"; or {req.min_key}: {need} to exclude the {kept.classes - big_enough} classes "
                       f"with fewer than {need} images")
        out.append(
            f"{req.key}: {k_key}={req.k_max} + n_query={req.n_query} = {need} images per class are needed but "
            f"class {kept.smallest_class!r} of {where} has only {low}; allowed: "
            f"{k_key} + n_query <= {low} ({allowed}){exclude}"
        )
    return out


def check_episode_shapes(params: Params, prepared_dir: str | Path) -> None:
    """Check every configured episode request against the prepared data.

    Covers `episodes.sets.*` (each shot count, after `min_images_per_class`),
    the meta-training episodes of every `meta_train.sources` dataset (each
    with its own k_shot / n_query / min_images_per_class, with rotation
    augmentation) and the meta-val episodes (first source's meta_val split,
    that source's shape, no rotation).

    Args:
        params: validated params.
        prepared_dir: the prepared store (data/prepared).

    Raises:
        ConfigError: one line per problem, each naming the params key, what the
            data offers and the allowed values.
        DataError: a dataset the params name is not prepared.
    """
    datasets: list[str] = []
    if params.episodes is not None:
        datasets += [s.dataset for s in params.episodes.sets.values()]
    if params.meta_train is not None:
        datasets += [s.dataset for s in params.meta_train.sources]
    if not datasets:
        return
    shapes = split_shapes(prepared_dir, datasets)

    def splits_of(dataset: str) -> list[str]:
        return [s for s in SPLIT_ORDER if (dataset, s) in shapes]

    problems: list[str] = []
    if params.episodes is not None:
        for name, s in params.episodes.sets.items():
            key = f"episodes.sets.{name}"
            req = Request(key, f"{key}.n_way", f"{key}.min_images_per_class", s.n_way, max(s.shots), s.n_query,
                          s.min_images_per_class, False, "max(shots)")
            problems += _request_problems(req, f"{key}.split", shapes.get((s.dataset, s.split)),
                                          f"{s.dataset}/{s.split}", splits_of(s.dataset))
    m = params.meta_train
    if m is not None:
        from metatransfer.training.sources import source_shape

        def request(i: int, rotation: bool) -> Request:
            src = m.sources[i]
            k, q = source_shape(m, src)
            own = src.k_shot is not None or src.n_query is not None
            return Request(f"meta_train.sources[{i}]" if own else "meta_train", "meta_train.n_way",
                           f"meta_train.sources[{i}].min_images_per_class", m.n_way, k, q,
                           src.min_images_per_class, rotation, "k_shot")

        for i, src in enumerate(m.sources):
            problems += _request_problems(request(i, m.rotation_augment), "meta_train.sources",
                                          shapes.get((src.dataset, "meta_train")), f"{src.dataset}/meta_train",
                                          splits_of(src.dataset))
        first = m.sources[0].dataset
        problems += _request_problems(request(0, False), "meta_train.sources[0]", shapes.get((first, "meta_val")),
                                      f"{first}/meta_val (the meta-val episodes)", splits_of(first))
    if problems:
        unique = list(dict.fromkeys(problems))
        raise ConfigError(
            "params do not fit the prepared data:\n  - " + "\n  - ".join(unique)
            + "\nFix these keys in params.yaml (or prepare more data) and re-run."
        )


def label_uses(params: Params, targets: Iterable[str] | None = None) -> list[tuple[str, str, str]]:
    """Every params key that needs a dataset's labels: (key, dataset, what it uses them for).

    Args:
        params: validated params.
        targets: only these fine-tuned targets (and no other use); default: every use, with every
            target of finetune.targets that is not a finetune.unlabeled entry.
    """
    uses: list[tuple[str, str, str]] = []
    f = params.finetune
    if targets is None:
        if params.episodes is not None:
            uses += [(f"episodes.sets.{name}.dataset", s.dataset, "its episodes need labelled supports and queries")
                     for name, s in params.episodes.sets.items()]
        if params.meta_train is not None:
            uses += [(f"meta_train.sources[{i}].dataset", s.dataset, "meta-training episodes need labels")
                     for i, s in enumerate(params.meta_train.sources)]
        if params.pretrain is not None:
            uses += [(f"pretrain.datasets[{i}]", d, "pre-training is supervised")
                     for i, d in enumerate(params.pretrain.datasets)]
        targets = [t for t in f.targets if t not in f.unlabeled] if f is not None else []
    uses += [("finetune.targets", t, f"fine-tuning needs labelled images; to cluster it without labels add "
              f"finetune.unlabeled.{t} (e.g. {{k: 2}}; docs/guide.md, \"Targets without labels\")")
             for t in targets]
    return uses


def check_labels(params: Params, prepared_dir: str | Path, targets: Iterable[str] | None = None) -> None:
    """Refuse every use that needs labels (`label_uses`) of a dataset prepared without labels.

    Datasets not prepared are left to the checks that read their data (they name them).

    Args:
        params: validated params.
        prepared_dir: the prepared store.
        targets: see `label_uses`.

    Raises:
        ConfigError: one line per use, naming the key, the dataset, its folder and what to do.
    """
    problems = []
    for key, dataset, why in label_uses(params, targets):
        if not (Path(prepared_dir) / dataset / MANIFEST_FILE).is_file() or has_labels(prepared_dir, dataset):
            continue
        folder = params.prepare.image_folders.get(dataset)
        where = (f"its folder {folder.path} (prepare.image_folders.{dataset}.path) has no class sub-folders"
                 if folder is not None else f"its prepared store {Path(prepared_dir) / dataset} has no labels")
        problems.append(f"{key}: {dataset!r} has no labels ({where}); {why}")
    if problems:
        raise ConfigError("a dataset without labels is used where labels are needed:\n  - " + "\n  - ".join(problems)
                          + "\nA dataset without labels can only be clustered (finetune.unlabeled.<name>); or sort "
                          "its images into class folders and re-run prepare.")


def check_finetune_classes(params: Params, prepared_dir: str | Path, targets: Iterable[str] | None = None) -> None:
    """Refuse fine-tuning targets with a class under `finetune.min_images_per_class` labelled images.

    Fine-tuning never drops a class: the target model's head, the evaluation
    on the test split and serving all cover every class of the target (labels
    are indices into its class names), so a class left out of fine-tuning
    would still be predicted from a head row no image shaped, and scored. The
    minimum is therefore a guard, checked from the manifests of the targets'
    train splits (what fine-tuning draws its labelled images from).

    A target without any label (`check_labels`) is refused first, whatever the minimum.

    Args:
        params: validated params (nothing is checked without a finetune
            section; no class count with a minimum of 0).
        prepared_dir: the prepared store.
        targets: the targets to check (default: finetune.targets but the finetune.unlabeled ones).

    Raises:
        ConfigError: naming the key and, per target, every class under the
            minimum with its images, and what to do; or a target without labels.
        DataError: a target is not prepared.
    """
    f = params.finetune
    if f is None:
        return
    names = [t for t in f.targets if t not in f.unlabeled] if targets is None else list(targets)
    check_labels(params, prepared_dir, names)
    if f.min_images_per_class <= 0:
        return
    shapes = split_shapes(prepared_dir, names)
    problems = []
    for target in names:
        shape = shapes.get((target, "train"))
        if shape is None:
            continue  # no train split: fine-tuning names that itself
        _, short = without_small_classes(shape, f.min_images_per_class)
        if short:
            listed = ", ".join(f"{c} ({n})" for c, n in short.items())
            problems.append(f"{target}/train: {len(short)} of {shape.classes} classes have fewer: {listed}")
    if problems:
        raise ConfigError(
            f"finetune.min_images_per_class: {f.min_images_per_class} labelled images per class are required but\n  - "
            + "\n  - ".join(problems)
            + "\nFine-tuning keeps every class of a target (the model head, evaluation and serving cover them "
            "all), so it cannot exclude a class: add images to these classes (or leave them out of the "
            "target's data), lower finetune.min_images_per_class, or drop the target from finetune.targets."
        )


def check(params: Params, root: str | Path) -> None:
    """Everything to verify before a long stage starts: labels, episode shapes and fine-tuning minimums vs data.

    Args:
        params: validated params.
        root: the project root (the prepared store is `params.data.prepared_dir` under it).

    Raises:
        ConfigError, DataError: see `check_labels`, `check_episode_shapes` and `check_finetune_classes`.
    """
    check_labels(params, Path(root) / params.data.prepared_dir)
    check_episode_shapes(params, Path(root) / params.data.prepared_dir)
    check_finetune_classes(params, Path(root) / params.data.prepared_dir)

