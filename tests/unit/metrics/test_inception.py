"""The FID Inception-v3: architecture and parameter names of the published weights, the TF input convention, and
the weights lookup (explicit path, hub cache, download, SHA-256, offline message), all offline."""

import hashlib
import shutil

import pytest
import torch

from diffuse.errors import UserError
from diffuse.metrics import inception as inc


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No test may reach the network: downloads are forbidden and the hub cache is a temp dir."""
    monkeypatch.setenv("DIFFUSE_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))


def published_like_state(seed=0):
    """A state dict with the published file's keys and shapes (no num_batches_tracked, as the TF port has none),
    with values that keep activations at unit scale through 94 conv layers."""
    g = torch.Generator().manual_seed(seed)
    net = inc.FIDInceptionV3()
    state = {}
    for k, v in net.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        if k.endswith("conv.weight"):
            fan_in = v[0].numel()
            state[k] = torch.randn(v.shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif k.endswith("running_var"):
            state[k] = torch.rand(v.shape, generator=g) + 0.5
        elif k.endswith(("running_mean", "bn.bias")):
            state[k] = torch.randn(v.shape, generator=g) * 0.1
        else:
            state[k] = torch.randn(v.shape, generator=g) * 0.05 + (1.0 if k.endswith("bn.weight") else 0.0)
    return state


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "random-inception.pth"
    torch.save(published_like_state(), path)
    return path


def test_parameter_names_and_sizes_match_the_published_port():
    state = published_like_state()
    assert len(state) == 472  # 94 conv + batch-norm layers (conv weight, bn weight/bias/mean/var) and fc weight/bias
    assert state["fc.weight"].shape == (1008, 2048) and state["Mixed_7c.branch_pool.conv.weight"].shape == (
        192,
        2048,
        1,
        1,
    )
    # The published weights-inception-2015-12-05-6726825d.pth is 95,628,359 bytes of float32 tensors and the
    # torch.save container around them (~180 bytes per tensor); any missing or misshapen layer of more than
    # ~50k parameters would show here.
    data = 4 * sum(v.numel() for v in state.values())
    assert 0 < 95_628_359 - data < 200_000


def test_outputs_pool3_and_1008_logits_for_any_input_size(weights):
    net, _ = inc.load_inception(weights, sha256=None)
    x = torch.randint(0, 256, (2, 3, 12, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x[0] = x[0, :1]  # image 0 is gray: the same values in the three channels
    pool, logits = net(x)
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008) and pool.dtype == torch.float32
    assert (pool >= 0).all() and pool.std() > 0 and not torch.allclose(pool[0], pool[1])  # not collapsed
    # The IS logits are pool3 times the classifier weights, without its bias (as the reference IS code does).
    assert torch.allclose(logits, pool @ net.fc.weight.T, atol=1e-4)
    # A 1-channel image is read as that channel in all three, and alone gives what it gave in a batch.
    assert torch.allclose(net(x[:1, :1])[0][0], pool[0], atol=1e-4)


def test_input_convention_uint8_to_minus_one_one():
    for value, expected in ((128, 0.0), (0, -1.0), (255, 127 / 128)):
        x = inc.preprocess(torch.full((1, 3, 5, 7), value, dtype=torch.uint8))
        assert x.shape == (1, 3, 299, 299) and torch.all(x == expected)
    with pytest.raises(TypeError, match="uint8"):
        inc.preprocess(torch.zeros(1, 3, 8, 8))


def test_resize_is_tensorflow1_bilinear():
    # TF1 (align_corners=False): output j samples input coordinate j * in / out, the upper neighbour clamped.
    # On a ramp v[i] = i that is min(j * in / out, in - 1), in both axes.
    n_in, n_out = 32, 299
    ramp = torch.arange(n_in, dtype=torch.float32)
    x = (ramp[:, None] * 100 + ramp[None, :]).expand(1, 1, n_in, n_in)
    y = inc.resize_bilinear_tf1(x, n_out)
    src = torch.clamp(torch.arange(n_out, dtype=torch.float64) * n_in / n_out, max=n_in - 1)
    expected = src[:, None] * 100 + src[None, :]
    assert torch.allclose(y[0, 0].double(), expected, atol=1e-3)
    # torch's half-pixel convention differs: the first output pixel would be input 0 there too, but the
    # second is (1.5 * 32 / 299 - 0.5) < 0.107 = 1 * 32 / 299: the grid is shifted.
    assert y[0, 0, 0, 1] == pytest.approx(32 / 299, abs=1e-5)
    assert torch.equal(inc.resize_bilinear_tf1(x, n_in), x)  # same size: identity


def test_tensorflow_same_average_pool_ignores_padding():
    ones = torch.ones(1, 1, 5, 5)
    assert torch.equal(inc._avg_pool_same(ones), ones)  # with the padding counted, corners would be 4/9


def test_explicit_weights_load_strictly_and_are_hashed(weights):
    path = inc.find_weights(str(weights))
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    net, sha = inc.load_inception(path, sha256=digest)
    assert sha == digest
    assert torch.equal(
        net.Mixed_6e.branch7x7dbl_5.conv.weight,
        torch.load(weights, weights_only=True)["Mixed_6e.branch7x7dbl_5.conv.weight"],
    )
    with pytest.raises(UserError, match="does not exist"):
        inc.find_weights(str(weights.parent / "nope.pth"))


def test_a_file_with_another_hash_is_refused(weights):
    with pytest.raises(UserError) as e:
        inc.load_inception(weights)  # the published SHA-256 by default
    msg = str(e.value)
    assert inc.SHA256 in msg and inc.URL in msg and "metrics.inception_sha256=null" in msg and "\n" not in msg


def test_missing_or_extra_keys_are_refused(tmp_path):
    state = published_like_state()
    del state["Mixed_5b.branch_pool.bn.running_var"]
    torch.save(state, tmp_path / "short.pth")
    with pytest.raises(UserError, match="do not fit.*Mixed_5b.branch_pool.bn.running_var"):
        inc.load_inception(tmp_path / "short.pth", sha256=None)
    (tmp_path / "junk.pth").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a readable weights file"):
        inc.load_inception(tmp_path / "junk.pth", sha256=None)


def test_hub_cache_is_searched_under_both_published_names(weights):
    cache = torch.hub.get_dir() + "/checkpoints"
    shutil.os.makedirs(cache)
    for name in (inc.ALT_FILENAMES[0], inc.FILENAME):
        shutil.copy(weights, f"{cache}/{name}")
        assert str(inc.find_weights()) == f"{cache}/{name}"


def test_missing_offline_is_one_line_naming_file_url_and_place(monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(UserError) as e:
        inc.find_weights()
    msg = str(e.value)
    target = f"{torch.hub.get_dir()}/checkpoints/{inc.FILENAME}"
    assert inc.URL in msg and target in msg and "metrics.inception_weights=PATH" in msg and "\n" not in msg
    monkeypatch.delenv("DIFFUSE_OFFLINE")
    with pytest.raises(UserError, match="not available offline"):
        inc.find_weights(download=False)  # metrics.download=false forbids it too


def test_download_goes_into_the_hub_cache(monkeypatch, weights):
    monkeypatch.delenv("DIFFUSE_OFFLINE")
    calls = []

    def fake_download(url, dst, progress=True):
        calls.append(url)
        shutil.copy(weights, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    path = inc.find_weights()
    assert calls == [inc.URL] and str(path) == f"{torch.hub.get_dir()}/checkpoints/{inc.FILENAME}" and path.is_file()

    def failing(url, dst, progress=True):
        raise OSError("Network is unreachable")

    path.unlink()
    monkeypatch.setattr(torch.hub, "download_url_to_file", failing)
    with pytest.raises(UserError, match="not available offline"):
        inc.find_weights()
