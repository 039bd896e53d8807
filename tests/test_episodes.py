"""Episode samplers: host (numpy, domain modes, MLDG split) and on-device (jitted)."""

import jax
import numpy as np
import pytest

from fszjax.data import episodes

N_CLASSES, N_DOMAINS, PER = 8, 3, 3  # 3 examples of each class in each domain


def dataset():
  labels = np.repeat(np.arange(N_CLASSES) * 10 + 7, N_DOMAINS * PER)  # non-contiguous ids
  domains = np.tile(np.repeat(np.arange(N_DOMAINS), PER), N_CLASSES)
  n = len(labels)
  images = np.zeros((n, 4, 4, 1), np.float32)
  images[:, 0, 0, 0] = np.arange(n)  # pixel (0, 0) = example index
  return images, labels, domains


def index_of(x):
  return x[..., 0, 0, 0].astype(int)


def check_task(out, labels, n_way, k, q, t):
  assert out["support_x"].shape == (t, n_way * k, 4, 4, 1)
  assert out["query_x"].shape == (t, n_way * q, 4, 4, 1)
  assert out["classes"].shape == (t, n_way)
  np.testing.assert_array_equal(out["support_y"][0], np.repeat(np.arange(n_way), k))
  np.testing.assert_array_equal(out["query_y"][0], np.repeat(np.arange(n_way), q))
  for i in range(t):
    assert len(set(out["classes"][i].tolist())) == n_way  # distinct classes
    si, qi = index_of(out["support_x"][i]), index_of(out["query_x"][i])
    assert not set(si) & set(qi)  # support and query disjoint
    assert len(set(si)) == len(si) and len(set(qi)) == len(qi)
    # Task label j is original class classes[j].
    np.testing.assert_array_equal(labels[si], out["classes"][i][out["support_y"][i]])
    np.testing.assert_array_equal(labels[qi], out["classes"][i][out["query_y"][i]])


def test_sampler_shapes_labels_and_determinism():
  images, labels, domains = dataset()
  s = episodes.EpisodeSampler(images, labels, domains, n_way=5, k_shot=2, q_query=3, seed=3)
  out = s.sample(0, 4)
  check_task(out, labels, 5, 2, 3, 4)
  again = episodes.EpisodeSampler(images, labels, domains, n_way=5, k_shot=2, q_query=3, seed=3)
  for k in out:
    np.testing.assert_array_equal(out[k], again.sample(0, 4)[k])
  assert not np.array_equal(out["classes"], s.sample(1, 4)["classes"])
  other = episodes.EpisodeSampler(images, labels, domains, n_way=5, k_shot=2, q_query=3, seed=4)
  assert not np.array_equal(out["support_x"], other.sample(0, 4)["support_x"])
  it = s.batches(4, start=0)
  np.testing.assert_array_equal(next(it)["classes"], out["classes"])


def test_domain_modes_respect_domains():
  images, labels, domains = dataset()
  s = episodes.EpisodeSampler(images, labels, domains, n_way=4, k_shot=1, q_query=2, seed=0)
  same = s.sample(0, 6, mode="same_domain")
  check_task(same, labels, 4, 1, 2, 6)
  for i in range(6):
    d = same["support_domain"][i]
    assert same["query_domain"][i] == d
    assert set(domains[index_of(same["support_x"][i])]) == {d}
    assert set(domains[index_of(same["query_x"][i])]) == {d}
  cross = s.sample(0, 6, mode="cross_domain")
  check_task(cross, labels, 4, 1, 2, 6)
  for i in range(6):
    ds, dq = cross["support_domain"][i], cross["query_domain"][i]
    assert ds != dq
    assert set(domains[index_of(cross["support_x"][i])]) == {ds}
    assert set(domains[index_of(cross["query_x"][i])]) == {dq}
  held = s.sample(1, 4, mode="cross_domain", support_domains=[0, 1], query_domains=[2])
  assert set(held["query_domain"].tolist()) == {2} and set(held["support_domain"].tolist()) <= {0, 1}


def test_restrict_and_mldg_split():
  images, labels, domains = dataset()
  s = episodes.EpisodeSampler(images, labels, domains, n_way=3, k_shot=1, q_query=1, seed=0)
  sub = s.restrict(domains=[0, 2])
  out = sub.sample(0, 3)
  # Restricted samplers index into the original images; pixel (0,0) still names the example.
  assert set(domains[index_of(out["support_x"]).ravel()]) <= {0, 2}
  tr, te = s.mldg_split(5, n_meta_test=1)
  assert len(te) == 1 and sorted(np.concatenate([tr, te]).tolist()) == [0, 1, 2]
  b = s.mldg_batch(5, batch_size=7, n_meta_test=1)
  assert b["train"]["x"].shape == (7, 4, 4, 1)
  assert set(b["train"]["domain"].tolist()) <= set(tr.tolist())
  assert set(b["test"]["domain"].tolist()) == set(te.tolist())
  np.testing.assert_array_equal(s.classes[b["test"]["y"]], labels[index_of(b["test"]["x"])])
  with pytest.raises(episodes.EpisodeError, match="n_meta_test"):
    s.mldg_split(0, n_meta_test=3)


def test_sampler_errors():
  images, labels, domains = dataset()
  with pytest.raises(episodes.EpisodeError, match="lower n_way"):
    episodes.EpisodeSampler(images, labels, n_way=9)
  with pytest.raises(episodes.EpisodeError, match="needs domains"):
    episodes.EpisodeSampler(images, labels, n_way=2).sample(0, 1, mode="same_domain")
  s = episodes.EpisodeSampler(images, labels, domains, n_way=2, k_shot=3, q_query=1)
  with pytest.raises(episodes.EpisodeError, match="no domain"):
    s.sample(0, 1, mode="same_domain")  # 3 per class per domain < 4


def test_on_device_sampler_inside_jit():
  images, labels, _ = dataset()
  # Make one class too small to be drawn: keep only 2 of its examples.
  keep = np.ones(len(labels), bool)
  keep[np.nonzero(labels == 7)[0][2:]] = False
  images, labels = images[keep], labels[keep]
  images[:, 0, 0, 0] = np.arange(len(labels))
  data = episodes.to_device(images, labels)
  f = jax.jit(lambda k: episodes.sample_tasks(k, data, 5, 2, 1, 6))
  out = jax.tree.map(np.asarray, f(jax.random.key(0)))
  check_task(out, labels, 5, 2, 1, 6)
  assert 7 not in out["classes"]  # needs k_shot + q_query = 3 examples
  again = jax.tree.map(np.asarray, f(jax.random.key(0)))
  np.testing.assert_array_equal(out["support_x"], again["support_x"])
  assert not np.array_equal(out["classes"], np.asarray(f(jax.random.key(1))["classes"]))
