"""`python -m mae_jax.weights`: official PyTorch weights in and out, against a committed fixture.

tests/fixtures/make_official_fixture.py built an official-architecture MAE (timm 0.9.7
ParallelScalingBlock encoder, maes_microscopy decoder and names) and a CA-MAE encoder at reduced
size with random parameters, and recorded what PyTorch computes with them; no torch here. The
CA-MAE's official CAMAEDecoder (model.decoder="official_ca") has its own files.
"""
import json
import pathlib

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from configs import tiny
from mae_jax import weights
from mae_jax.train import checkpointing
from test_cli import error_line, run
from test_eval_e2e import run as run_e2e, write_annotations, write_screen

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
MAE_FILE = FIXTURES / "official_mae.safetensors"
REF = dict(np.load(FIXTURES / "official_reference.npz"))
CA_REF = dict(np.load(FIXTURES / "official_camae_reference.npz"))
# the fixture's CAMAEDecoder: width 16, one Block of 2 heads per channel, 6 channels
OFFICIAL_CA = dict(channel_agnostic=True, decoder="official_ca", decoder_width=16,
                   decoder_depth=1, decoder_heads=2)
TABLES = ("pos_embed", "decoder.pos_embeddings")  # fixed sin-cos buffers, regenerated on export
# the fixture's architecture as overrides of configs/tiny.py (depth 2, width 64, 2 heads, image 32)
OVERRIDES = {"patch_size": 16, "decoder_width": 8}
FLAGS = ["--config=configs/tiny.py", "--config.model.patch_size=16", "--config.model.decoder_width=8"]


def config(**model):
  c = tiny.get_config()
  c.model.update(OVERRIDES, **model)
  return c


def rel(a, b):
  return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def images(channels=None):
  x = REF["images"] if channels is None else REF["images"][:, channels]
  return x.transpose(0, 2, 3, 1)  # (B, C, H, W) as torch -> (B, H, W, C)


def official_ca() -> dict:
  """The CA-MAE encoder state dict (timm names): the standard encoder's tensors, its own two."""
  sd = {k.removeprefix("encoder.vit_backbone."): v for k, v in load_file(MAE_FILE).items()
        if k.startswith("encoder.vit_backbone.")}
  return {**sd, **load_file(FIXTURES / "official_camae_delta.safetensors")}


def official_ca_mae() -> dict:
  """The whole official CA-MAE (maes MAEModel names): CA encoder + CAMAEDecoder."""
  return {**{f"encoder.vit_backbone.{k}": v for k, v in official_ca().items()},
          **load_file(FIXTURES / "official_camae_decoder.safetensors")}


def one_line(excinfo):
  text = str(excinfo.value)
  assert "\n" not in text, text
  return text


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """{scan_layers: workdir} of the fixture imported both ways (in process)."""
  out = {}
  for scan in (False, True):
    workdir = tmp_path_factory.mktemp(f"imported_scan{scan}")
    result = weights.import_weights(MAE_FILE, config(scan_layers=scan), workdir)
    assert result["tensors"] == 50 and result["decoder"] == "imported", result
    assert result["source_format"] == "maes_microscopy" and result["scan_layers"] == scan
    out[scan] = workdir
  return out


@pytest.mark.parametrize("scan", [False, True], ids=["per_layer", "scan_layers"])
def test_imported_model_computes_what_pytorch_computes(imported, scan):
  model, cfg = checkpointing.load_for_eval(imported[scan])
  assert bool(cfg.model.scan_layers) == scan
  tokens = np.asarray(weights.encoder_tokens(model, images()))
  assert rel(tokens, REF["tokens"]) <= 1e-5
  assert rel(model.embed(images()), REF["tokens"][:, 1:].mean(1)) <= 1e-5
  assert rel(model.embed(images(), pooling="cls"), REF["tokens"][:, 0]) <= 1e-5
  # the decoder too: the masked forward with PyTorch's noise (maes transformer_random_masking)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mae_jax.models import mae  # pylint: disable=g-import-not-at-top
  tok, _, c = model._tokens(mae.standardize(jnp.asarray(images())))  # pylint: disable=protected-access
  shuffle = jnp.argsort(jnp.asarray(REF["noise"]), axis=1)
  kept = jnp.take_along_axis(tok, shuffle[:, :1, None], axis=1)  # 1 of 4 tokens at ratio 0.75
  latent = model.norm(model._encode(kept))  # pylint: disable=protected-access
  pred = model._decode(latent, jnp.argsort(shuffle, axis=1), c)  # pylint: disable=protected-access
  assert rel(pred, REF["reconstruction"]) <= 1e-5


def test_ca_mae_encoder_imports_and_stays_channel_agnostic(tmp_path):
  src = tmp_path / "camae.safetensors"
  save_file(official_ca(), str(src))
  cfg = config(channel_agnostic=True)
  with pytest.raises(weights.WeightsError) as e:  # no official counterpart of the shared decoder
    weights.import_weights(src, cfg, tmp_path / "refused")
  assert "--encoder_only" in one_line(e) and "CAMAEDecoder" in one_line(e)
  assert "model.decoder='official_ca'" in one_line(e)
  result = weights.import_weights(src, cfg, tmp_path / "ca", encoder_only=True)
  assert result["decoder"] == "initialised (seed 0)" and result["encoder_only"], result
  model, _ = checkpointing.load_for_eval(tmp_path / "ca")
  assert rel(weights.encoder_tokens(model, images()), REF["ca_tokens"]) <= 1e-5
  sub = [int(c) for c in REF["ca_channels"]]  # 4 channels in another order
  assert rel(weights.encoder_tokens(model, images(sub)), REF["ca_tokens_sub"]) <= 1e-5
  # and back out: the timm names of the official CA encoder, bit-exact but the fixed table
  out = tmp_path / "ca_out.safetensors"
  weights.export_weights(tmp_path / "ca", out, "timm")
  assert_same_tensors(load_file(out), official_ca())


def test_official_ca_decoder_imports_whole_computes_what_pytorch_computes_and_exports(tmp_path):
  """Stacked encoder blocks; import and export pass through the per-layer layout as well."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mae_jax.models import mae  # pylint: disable=g-import-not-at-top
  src = tmp_path / "camae_full.safetensors"
  save_file(official_ca_mae(), str(src))
  result = weights.import_weights(src, config(scan_layers=True, **OFFICIAL_CA), tmp_path / "ca")
  assert result["decoder"] == "imported" and result["skipped"] == 0, result
  assert result["tensors"] == len(official_ca_mae()) - 3  # all but pos_embed, placeholder, table
  model, _ = checkpointing.load_for_eval(tmp_path / "ca")
  x = mae.standardize(jnp.asarray(images()))
  tok, target, c = model._tokens(x)  # pylint: disable=protected-access
  shuffle = jnp.argsort(jnp.asarray(CA_REF["noise"]), axis=1)  # maes transformer_random_masking
  keep = int(tok.shape[1] * 0.25)
  latent = model.norm(model._encode(jnp.take_along_axis(tok, shuffle[:, :keep, None], axis=1)))  # pylint: disable=protected-access
  restore = jnp.argsort(shuffle, axis=1)
  pred = model._decode(latent, restore, c)  # pylint: disable=protected-access
  assert rel(pred, CA_REF["reconstruction"]) <= 1e-5
  mask = (restore >= keep).astype(jnp.float32)
  np.testing.assert_array_equal(mask, CA_REF["mask"])
  loss, mse, fourier = mae.reconstruction_loss(pred, target, mask, 16, 0.01)
  for got, name in ((loss, "loss"), (mse, "mse"), (fourier, "fourier")):
    assert rel(got, CA_REF[name]) <= 1e-5, name
  out = tmp_path / "ca_out.safetensors"  # and back out: the whole MAEModel, bit-exact
  exported = weights.export_weights(tmp_path / "ca", out, "maes_microscopy")
  assert_same_tensors(load_file(out), official_ca_mae())
  assert exported["parameters"] == sum(v.size for k, v in official_ca_mae().items()
                                       if not k.endswith(("pos_embed", "placeholder", "pos_embeddings")))


def test_official_ca_decoder_mistakes_are_one_line():
  sd, cfg = official_ca_mae(), config(**OFFICIAL_CA).model
  missing = {k: v for k, v in sd.items() if k != "decoder.decoders.3.0.mlp.fc2.bias"}
  with pytest.raises(weights.WeightsError) as e:
    weights.to_params(missing, cfg)
  assert one_line(e) == ("model parameters the source does not fill: "
                         "decoder.decoders.3.0.mlp.fc2.bias (1 in all)")
  with pytest.raises(weights.WeightsError) as e:  # a decoder stack per channel: 6 here
    weights.to_params(sd, config(**dict(OFFICIAL_CA, channels=4)).model)
  assert "decoder.decoders.5" in one_line(e) and "model.channels=4" in one_line(e)
  with pytest.raises(weights.WeightsError) as e:
    weights.to_params(sd, config(**dict(OFFICIAL_CA, decoder_depth=2)).model)
  assert "model.decoder_depth=2" in one_line(e)
  with pytest.raises(weights.WeightsError) as e:
    weights.to_params(sd, config(**dict(OFFICIAL_CA, decoder_width=32)).model)
  assert "(16, 64)" in one_line(e) and "(32, 64)" in one_line(e) and "decoder='official_ca'" in one_line(e)
  with pytest.raises(weights.WeightsError) as e:
    weights.to_params(dict(sd, **{"decoder.placeholder": sd["decoder.placeholder"] + 1}), cfg)
  assert "decoder.placeholder: not zero" in one_line(e)
  encoder = {k: v for k, v in sd.items() if k.startswith("encoder.")}
  with pytest.raises(weights.WeightsError) as e:  # an encoder alone: --encoder_only says so
    weights.to_params(encoder, cfg)
  assert "--encoder_only" in one_line(e)
  params, report = weights.to_params(sd, cfg, encoder_only=True)
  assert report["skipped"] == len(sd) - len(encoder) and report["decoder"].startswith("init")
  assert params["decoder"]["decoders"][0]["qkv"].shape == (6, 16, 3, 16)


def assert_same_tensors(got, want):
  assert sorted(got) == sorted(want)
  for name, value in want.items():
    assert got[name].dtype == np.float32 and got[name].shape == value.shape, name
    if name.endswith(TABLES):  # regenerated: equal to within a float32 ulp of PyTorch's sin/cos
      np.testing.assert_allclose(got[name], value, rtol=0, atol=2.5e-7, err_msg=name)
    else:
      np.testing.assert_array_equal(got[name], value, err_msg=name)  # bit-exact


def test_export_round_trips_bit_exactly(imported, tmp_path):
  official = load_file(MAE_FILE)
  for scan, workdir in imported.items():
    full = tmp_path / f"mae_{scan}.safetensors"
    result = weights.export_weights(workdir, full, "maes_microscopy")
    assert result["tensors"] == len(official) and result["step"] == 0, result
    assert_same_tensors(load_file(full), official)
    encoder = tmp_path / f"timm_{scan}.safetensors"
    weights.export_weights(workdir, encoder, "timm")
    assert_same_tensors(load_file(encoder), {k.removeprefix("encoder.vit_backbone."): v
                                             for k, v in official.items()
                                             if k.startswith("encoder.vit_backbone.")})


def test_hugging_face_folder_and_its_reimport(imported, tmp_path):
  folder = tmp_path / "hf"
  result = weights.export_weights(imported[True], f"{folder}/", "maes_microscopy")
  assert sorted(pathlib.Path(f).name for f in result["files"]) == [
      "README.md", "config.json", "model.safetensors"]
  hf = json.loads((folder / "config.json").read_text())
  assert hf["timm_kwargs"]["embed_dim"] == 64 and hf["timm_kwargs"]["depth"] == 2
  assert hf["decoder"]["embed_dim"] == 8 and hf["mae_jax_config"]["model"]["patch_size"] == 16
  card = (folder / "README.md").read_text()
  assert "ParallelScalingBlock" in card and '"patch_size": 16' in card
  again = weights.import_weights(folder, config(), tmp_path / "again")  # a folder: its model file
  assert again["source"].endswith("model.safetensors")
  model, _ = checkpointing.load_for_eval(tmp_path / "again")
  assert rel(weights.encoder_tokens(model, images()), REF["tokens"]) <= 1e-5


def test_wrapper_prefixes_and_bare_timm_encoders():
  official = load_file(MAE_FILE)
  params, _ = weights.to_params(official, config().model)
  wrapped = {f"model.{k}": v for k, v in official.items()}  # a Lightning checkpoint's names
  again, _ = weights.to_params(wrapped, config().model)
  import jax  # pylint: disable=g-import-not-at-top
  assert jax.tree.all(jax.tree.map(np.array_equal, params, again))
  encoder = {k.replace("encoder.vit_backbone.", "encoder."): v for k, v in official.items()
             if k.startswith("encoder.")}
  with pytest.raises(weights.WeightsError) as e:  # an encoder alone leaves the decoder empty
    weights.to_params(encoder, config().model)
  assert "encoder_decoder_proj.weight" in one_line(e) and "--encoder_only" in one_line(e)
  init = jax.tree.map(np.zeros_like, params)
  only, report = weights.to_params(encoder, config().model, encoder_only=True, init=init)
  assert np.array_equal(only["blocks"][1]["in_proj"], params["blocks"][1]["in_proj"])
  assert not only["decoder_pred"].any() and report["decoder"].startswith("kept")
  # OpenPhenom's timm global_pool="avg" keeps the final LayerNorm as fc_norm
  avg = {k.replace("backbone.norm.", "backbone.fc_norm."): v for k, v in official.items()}
  pooled, report = weights.to_params(avg, config().model)
  assert np.array_equal(pooled["norm"]["scale"], params["norm"]["scale"])
  assert any("fc_norm" in note for note in report["notes"])


@pytest.mark.parametrize("change,needles", [
    ({"depth": 3}, ["encoder.vit_backbone.blocks.1.", "2 blocks", "model.depth=3"]),
    ({"width": 128, "mlp_dim": 512}, ["encoder.vit_backbone.cls_token", "(1, 1, 64)", "(1, 1, 128)"]),
    ({"num_heads": 4}, ["encoder.vit_backbone.blocks.0.q_norm.weight", "(32,)", "(16,)"]),
    ({"patch_size": 8}, ["patch_embed.proj.weight", "(64, 6, 16, 16)", "(64, 6, 8, 8)"]),
    ({"channel_agnostic": True}, ["patch_embed.proj.weight", "(64, 6, 16, 16)", "(64, 1, 16, 16)",
                                  "not CA-MAE"]),
    ({"image_size": 64}, ["encoder.vit_backbone.pos_embed", "(1, 5, 64)", "(1, 17, 64)"]),
])
def test_config_mismatch_is_one_line_naming_tensor_and_shapes(change, needles):
  ca = change.get("channel_agnostic", False)  # CA-MAE imports the encoder only
  with pytest.raises(weights.WeightsError) as e:
    weights.to_params(load_file(MAE_FILE), config(**change).model, encoder_only=ca)
  for needle in needles:
    assert needle in one_line(e), one_line(e)


def test_ca_encoder_into_a_standard_config_says_so():
  with pytest.raises(weights.WeightsError) as e:
    weights.to_params(official_ca(), config().model, encoder_only=True)
  assert one_line(e).startswith("patch_embed.proj.weight: source shape (64, 1, 16, 16), the "
                                "config expects (64, 6, 16, 16) (a channel-agnostic CA-MAE")


def test_learned_positions_and_foreign_tensors_are_refused():
  official = load_file(MAE_FILE)
  learned = dict(official, **{"encoder.vit_backbone.pos_embed":
                              official["encoder.vit_backbone.pos_embed"] + 0.01})
  with pytest.raises(weights.WeightsError) as e:
    weights.to_params(learned, config().model)
  assert "learned positional embeddings" in one_line(e)
  extra = dict(official, **{"head.weight": np.zeros((10, 64), np.float32)})
  with pytest.raises(weights.WeightsError) as e:
    weights.to_params(extra, config().model)
  assert "no place in the model: head.weight (1 in all)" in one_line(e)


def test_command_errors_are_one_line(tmp_path):
  deep = run("mae_jax.weights", "import", f"--from={MAE_FILE}", *FLAGS, "--config.model.depth=3",
             f"--workdir={tmp_path / 'deep'}")
  assert "2 blocks" in error_line(deep, "mae_jax.weights") and "model.depth=3" in deep.stderr
  missing = tmp_path / "missing.safetensors"
  save_file({k: v for k, v in load_file(MAE_FILE).items()
             if k != "encoder.vit_backbone.blocks.1.ls.gamma"}, str(missing))
  line = error_line(run("mae_jax.weights", "import", f"--from={missing}", *FLAGS,
                        f"--workdir={tmp_path / 'missing'}"), "mae_jax.weights")
  assert line == ("model parameters the source does not fill: blocks.1.ls.gamma (1 in all)")
  assert not (tmp_path / "deep").exists() and not (tmp_path / "missing").exists()
  pickled = tmp_path / "model.safetensors"  # what OpenPhenom ships: a torch.save zip
  pickled.write_bytes(b"PK\x03\x04" + bytes(60))
  try:
    import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    line = error_line(run("mae_jax.weights", "import", f"--from={pickled}", *FLAGS,
                          f"--workdir={tmp_path / 'p'}"), "mae_jax.weights")
    assert "install torch" in line and "OpenPhenom" in line
  assert "expected one command" in error_line(run("mae_jax.weights", "convert"), "mae_jax.weights")
  assert "--ckpt and --to required" in error_line(run("mae_jax.weights", "export"),
                                                  "mae_jax.weights")


def test_recall_embeds_with_an_imported_checkpoint(tmp_path, cache_dir):
  workdir = tmp_path / "phenom"
  out = run("mae_jax.weights", "import", f"--from={MAE_FILE}", *FLAGS, f"--workdir={workdir}")
  assert out.returncode == 0, out.stderr[-3000:]
  assert json.loads(out.stdout.strip().splitlines()[-1])["checkpoint"].endswith("checkpoints/0")
  manifest = write_screen(tmp_path, np.random.default_rng(0))  # 64² sites: 4 tiles of 32²
  recall = run_e2e(["eval.recall", f"--ckpt={workdir}", f"--manifest={manifest}",
                    f"--out={tmp_path / 'eval'}", f"--annotations_dir={write_annotations(tmp_path / 'ann')}",
                    "--arm_correction=false"], cache_dir)
  saved = json.loads((tmp_path / "eval" / "recall.json").read_text())
  assert json.loads(recall.stdout.strip().splitlines()[-1]) == saved
  assert saved["n_perturbations"] == 24


def test_training_starts_from_imported_weights(imported, tmp_path, devices):
  """main with --config.init_from=<imported workdir>: step 1's loss is the imported model's loss
  on that step's batch and key (parameters restored, optimiser fresh); a config whose model
  differs is refused in one line."""
  import jax  # pylint: disable=g-import-not-at-top
  from mae_jax.train import batches, loop  # pylint: disable=g-import-not-at-top
  c = config(scan_layers=True)
  c.update(total_steps=1, batch_size=8, log_every=1, init_from=str(imported[True]))
  result = loop.train_and_evaluate(c, tmp_path / "run")
  assert result["status"] == "done"
  logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
  model, _ = checkpointing.load_for_eval(imported[True])
  x = batches.SyntheticCrops(c, None).images(step=1, start=0, stop=8)
  want, _ = model({"image": x}, jax.random.fold_in(jax.random.key(c.seed), 0))
  np.testing.assert_allclose(logged, float(want), rtol=1e-5)
  deeper = config(scan_layers=True, depth=3)
  deeper.update(total_steps=1, batch_size=8, init_from=str(imported[True]))
  with pytest.raises(checkpointing.CheckpointError) as e:
    loop.train_and_evaluate(deeper, tmp_path / "deeper")
  assert one_line(e).endswith("its model differs from this config in model.depth (2 there, 3 here)")
