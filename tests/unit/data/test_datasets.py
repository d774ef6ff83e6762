"""Real dataset formats, built small in tmp_path and read back exactly: CIFAR-10, IDX (MNIST), image folders."""

import gzip
import hashlib
import io
import pickle
import struct
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from diffuse.data import ImageDataset, build_dataset, flip_mask
from diffuse.errors import UserError

# -- CIFAR-10 ----------------------------------------------------------------------------------------------


def make_cifar(path, n=6, seed=0):
    """A cifar-10-python.tar.gz in the official layout: n images per batch; returns (train, test) arrays."""
    rng = np.random.default_rng(seed)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        batches[name] = (data, labels)
    with tarfile.open(path, "w:gz") as tar:

        def add(name, obj):
            raw = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))

        for name, (data, labels) in batches.items():
            add(name, {b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": [b"x.png"] * n})
        add("batches.meta", {b"label_names": [b"airplane"] * 10, b"num_cases_per_batch": n})

    def stack(names):
        x = np.concatenate([batches[k][0] for k in names]).reshape(-1, 3, 32, 32)
        return torch.from_numpy(x), torch.tensor(sum((batches[k][1] for k in names), []))

    return stack([f"data_batch_{i}" for i in range(1, 6)]), stack(["test_batch"])


def md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_cifar10_archive_read_back_exactly(tmp_path, compose_cfg):
    (train_x, train_y), (test_x, test_y) = make_cifar(tmp_path / "cifar-10-python.tar.gz")
    base = [
        "dataset=cifar10",
        f"dataset.root={tmp_path}",
        "dataset.download=false",
        f"dataset.md5={md5(tmp_path / 'cifar-10-python.tar.gz')}",
    ]
    ds = build_dataset(compose_cfg("train", base).dataset)
    assert ds.images.dtype == torch.uint8 and ds.labels.dtype == torch.int64 and ds.num_classes == 10
    assert ds.images.shape == (30, 3, 32, 32) and ds.flip
    assert torch.equal(ds.images, train_x) and torch.equal(ds.labels, train_y)
    test = build_dataset(compose_cfg("train", base + ["dataset.split=test"]).dataset)
    assert torch.equal(test.images, test_x) and torch.equal(test.labels, test_y)
    # The plane layout matters: pixel (c, y, x) of image 0 is byte c*1024 + y*32 + x of its row.
    assert train_x[0, 2, 5, 7] == train_x.reshape(30, 3072)[0, 2 * 1024 + 5 * 32 + 7]


def test_cifar10_checksum_mismatch_refused_before_unpickling(tmp_path, compose_cfg, monkeypatch):
    make_cifar(tmp_path / "cifar-10-python.tar.gz")
    import diffuse.data.cifar10 as c

    monkeypatch.setattr(c, "read_archive", lambda *a: pytest.fail("read before the checksum was checked"))
    cfg = compose_cfg("train", ["dataset=cifar10", f"dataset.root={tmp_path}", "dataset.download=false"])
    with pytest.raises(UserError, match="MD5 is .*expected c58f30108f718f92721af3b95e74349a"):
        build_dataset(cfg.dataset)


def test_cifar10_truncated_archive_refused(tmp_path, compose_cfg):
    p = tmp_path / "cifar-10-python.tar.gz"
    make_cifar(p)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    cfg = compose_cfg(
        "train", ["dataset=cifar10", f"dataset.root={tmp_path}", "dataset.download=false", "dataset.md5=null"]
    )
    with pytest.raises(UserError, match="corrupted or truncated"):
        build_dataset(cfg.dataset)


def test_cifar10_batch_with_foreign_globals_is_not_unpickled(tmp_path, compose_cfg):
    """A batch that would call anything beyond numpy's array reconstruction is refused, not executed."""

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    p = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(p, "w:gz") as tar:
        raw = pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2)
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
    cfg = compose_cfg(
        "train", ["dataset=cifar10", f"dataset.root={tmp_path}", "dataset.download=false", "dataset.md5=null"]
    )
    with pytest.raises(UserError, match=r"not a valid CIFAR-10 batch: (__builtin__|builtins)\.print is not allowed"):
        build_dataset(cfg.dataset)


def test_cifar10_offline_without_archive_names_file_dir_and_url(tmp_path, compose_cfg):
    cfg = compose_cfg("train", ["dataset=cifar10", f"dataset.root={tmp_path}/cache", "dataset.download=false"])
    with pytest.raises(UserError) as e:
        build_dataset(cfg.dataset)
    msg = str(e.value)
    assert "cifar-10-python.tar.gz" in msg and f"{tmp_path}/cache" in msg and "https://www.cs.toronto.edu/" in msg
    assert "\n" not in msg


# -- IDX (MNIST, Fashion-MNIST) ----------------------------------------------------------------------------


def idx_bytes(a: np.ndarray) -> bytes:
    return b"\x00\x00\x08" + bytes([a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()


def make_idx(root, split="train", n=7, gz=True, seed=0, constant=False):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 1, 1) if constant else (n, 28, 28), dtype=np.uint8)
    x = np.broadcast_to(x, (n, 28, 28)).copy()
    y = rng.integers(0, 10, n).astype(np.uint8)
    prefix = "train" if split == "train" else "t10k"
    root.mkdir(parents=True, exist_ok=True)
    for name, a in ((f"{prefix}-images-idx3-ubyte", x), (f"{prefix}-labels-idx1-ubyte", y)):
        raw = idx_bytes(a)
        (root / (name + ".gz" if gz else name)).write_bytes(gzip.compress(raw) if gz else raw)
    return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))


@pytest.mark.parametrize("gz", [True, False])
def test_idx_read_back_exactly_padded(tmp_path, compose_cfg, gz):
    x, y = make_idx(tmp_path, gz=gz)
    cfg = compose_cfg(
        "train", ["dataset=mnist", f"dataset.root={tmp_path}", "dataset.download=false", "dataset.verify=false"]
    )
    ds = build_dataset(cfg.dataset)
    assert ds.images.shape == (7, 1, 32, 32) and ds.images.dtype == torch.uint8 and ds.labels.dtype == torch.int64
    assert torch.equal(ds.images[:, 0, 2:30, 2:30], x) and torch.equal(ds.labels, y)
    border = ds.images.clone()
    border[:, :, 2:30, 2:30] = 0
    assert border.sum() == 0 and not ds.flip


def test_idx_resize_and_test_split(tmp_path, compose_cfg):
    make_idx(tmp_path, split="train", seed=1)
    x, y = make_idx(tmp_path, split="test", n=5, seed=2, constant=True)
    cfg = compose_cfg(
        "train",
        [
            "dataset=fashion_mnist",
            f"dataset.root={tmp_path}",
            "dataset.download=false",
            "dataset.verify=false",
            "dataset.split=test",
            "dataset.fit=resize",
            "dataset.resolution=14",
        ],
    )
    ds = build_dataset(cfg.dataset)
    assert ds.images.shape == (5, 1, 14, 14) and torch.equal(ds.labels, y)
    # Each test image is one grey level: resizing keeps it (and the images are not the train split's).
    assert torch.equal(ds.images[:, 0], x[:, :14, :14]) and len(x[:, 0, 0].unique()) > 1


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda raw: raw[:-10], "truncated or corrupted"),
        (lambda raw: b"\x00\x00\x09\x03" + raw[4:], "magic is 00000903"),
    ],
)
def test_idx_bad_magic_or_size_refused(tmp_path, compose_cfg, damage, match):
    make_idx(tmp_path, gz=False)
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(damage(p.read_bytes()))
    cfg = compose_cfg("train", ["dataset=mnist", f"dataset.root={tmp_path}", "dataset.download=false"])
    with pytest.raises(UserError, match=match) as e:
        build_dataset(cfg.dataset)
    assert str(p) in str(e.value)


def test_idx_truncated_gzip_and_checksum_refused(tmp_path, compose_cfg):
    make_idx(tmp_path, gz=True)
    cfg = compose_cfg("train", ["dataset=mnist", f"dataset.root={tmp_path}", "dataset.download=false"])
    with pytest.raises(UserError, match="train-images-idx3-ubyte.gz is corrupted .*expected f68b3c2d"):
        build_dataset(cfg.dataset)  # our own files are not the official ones
    p = tmp_path / "train-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:40])
    cfg = compose_cfg(
        "train", ["dataset=mnist", f"dataset.root={tmp_path}", "dataset.download=false", "dataset.verify=false"]
    )
    with pytest.raises(UserError, match="corrupted or truncated"):
        build_dataset(cfg.dataset)


def test_idx_offline_message(tmp_path, compose_cfg):
    cfg = compose_cfg("train", ["dataset=mnist", f"dataset.root={tmp_path}", "dataset.download=false"])
    with pytest.raises(UserError, match=f"train-images-idx3-ubyte.gz not found in {tmp_path}: download https://"):
        build_dataset(cfg.dataset)


# -- image folders -----------------------------------------------------------------------------------------


def test_folder_with_classes_read_back_exactly(tmp_path, compose_cfg, capsys):
    rng = np.random.default_rng(0)
    expected = {}
    for cls, fmt in (("b_dogs", "png"), ("a_cats", "webp")):
        (tmp_path / cls / "sub").mkdir(parents=True)
        for i in range(2):
            a = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            f = tmp_path / cls / ("sub" if i else ".") / f"{i}.{fmt}"
            Image.fromarray(a).save(f, lossless=True) if fmt == "webp" else Image.fromarray(a).save(f)
            expected[f.resolve()] = (a, cls)
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(tmp_path / "a_cats" / "gray.png")
    (tmp_path / "b_dogs" / "broken.jpg").write_bytes(b"\xff\xd8not really a jpeg")
    cfg = compose_cfg("train", ["dataset=folder", f"dataset.path={tmp_path}", "dataset.resolution=8"])
    ds = build_dataset(cfg.dataset)
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "skipped 1 unreadable" in err
    assert len(ds) == 5 and ds.num_classes == 2 and ds.channels == 3 and ds.flip
    # Sorted class names: a_cats -> 0, b_dogs -> 1; every RGB file's pixels come back exactly.
    assert ds.labels.tolist().count(0) == 3 and ds.labels.tolist().count(1) == 2
    for a, cls in expected.values():
        t = torch.from_numpy(a).permute(2, 0, 1)
        hits = [k for k in range(len(ds)) if torch.equal(ds.images[k], t)]
        assert len(hits) == 1 and ds.labels[hits[0]] == (cls == "b_dogs")
    gray = [
        k
        for k in range(len(ds))
        if torch.equal(ds.images[k, 0], ds.images[k, 1]) and torch.equal(ds.images[k, 1], ds.images[k, 2])
    ]
    assert len(gray) == 1  # the grayscale file became RGB


def test_folder_center_crop_and_resize(tmp_path, compose_cfg):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, 10:30] = 200  # the central 20x20 square is bright, the sides dark
    Image.fromarray(a).save(tmp_path / "wide.png")
    ds = build_dataset(
        compose_cfg("train", ["dataset=folder", f"dataset.path={tmp_path}", "dataset.resolution=10"]).dataset
    )
    assert ds.images.shape == (1, 3, 10, 10) and ds.num_classes == 1
    assert (ds.images == 200).all()


@pytest.mark.parametrize("make", ["missing", "empty", "only_bad"])
def test_folder_empty_or_missing_is_user_error(tmp_path, compose_cfg, make):
    d = tmp_path / "imgs"
    if make != "missing":
        d.mkdir()
    if make == "only_bad":
        (d / "x.png").write_bytes(b"nope")
    with pytest.raises(UserError, match=f"dataset.path='{d}'"):
        build_dataset(compose_cfg("train", ["dataset=folder", f"dataset.path={d}"]).dataset)


# -- flip --------------------------------------------------------------------------------------------------


def test_flip_is_deterministic_and_mirrors_exactly_the_chosen_images():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 4, 4), generator=g, dtype=torch.uint8)
    ds = ImageDataset(images, torch.arange(64), 64, flip=True)
    idx = torch.randperm(64, generator=g)[:32]
    x1, y1 = ds.batch(idx, generator=torch.Generator().manual_seed(5))
    x2, _ = ds.batch(idx, generator=torch.Generator().manual_seed(5))
    x3, _ = ds.batch(idx, generator=torch.Generator().manual_seed(6))
    assert torch.equal(x1, x2) and not torch.equal(x1, x3) and torch.equal(y1, idx)
    chosen = flip_mask(32, torch.Generator().manual_seed(5))
    assert 0 < chosen.sum() < 32
    orig = images[idx].float() / 127.5 - 1
    assert torch.equal(x1[chosen], orig[chosen].flip(-1)) and torch.equal(x1[~chosen], orig[~chosen])
    # Without a generator, or with flip off, nothing is mirrored and no randomness is consumed.
    assert torch.equal(ds.batch(idx)[0], orig)
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    assert torch.equal(ImageDataset(images, torch.arange(64), 64).batch(idx, generator=g)[0], orig)
    assert torch.equal(g.get_state(), state)


# -- experiments -------------------------------------------------------------------------------------------


def test_experiment_recipes_compose(compose_cfg):
    c = compose_cfg("train", ["experiment=cifar10_ddpm"])
    assert (c.dataset.name, c.dataset.flip, c.model.ch, c.model.dropout) == ("cifar10", True, 128, 0.1)
    assert (c.schedule.kind, c.schedule.T, c.trainer.lr, c.trainer.batch_size) == ("linear", 1000, 2e-4, 128)
    assert (c.trainer.warmup, c.trainer.ema_decay, c.trainer.steps) == (5000, 0.9999, 800000)
    f = compose_cfg("train", ["experiment=fashion_mnist"])
    assert (f.dataset.name, f.dataset.resolution, f.dataset.fit, f.dataset.channels, f.model.ch) == (
        "fashion_mnist",
        32,
        "pad",
        1,
        64,
    )
