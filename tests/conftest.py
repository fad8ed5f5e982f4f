"""Test set-up: the Triton interpreter on CPU, seeding, and markers.

Without ``VTOK_FAST_TEST_GPU=1`` the suite runs on CPU: ``TRITON_INTERPRET=1`` is set here,
before any kernel module is imported, so the Triton kernels run in the interpreter on CPU
tensors. With ``VTOK_FAST_TEST_GPU=1`` (``bench/gpu_check.sh``) tests run on CUDA with real
kernels and the tests marked ``gpu`` are collected too.
"""
import os

GPU_RUN = os.environ.get("VTOK_FAST_TEST_GPU", "0") == "1"
if not GPU_RUN:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "gpu: needs a CUDA device; collected only with VTOK_FAST_TEST_GPU=1")
    config.addinivalue_line("markers", "aot: ahead-of-time compilation for sm_80/sm_90")
    config.addinivalue_line("markers", "smoke: the fast subset (python -m pytest -m smoke, under a minute)")


# The fast subset (`python -m pytest -m smoke`, under a minute on the 2-core CPU machine): for every
# op its forward (and gradients) against the reference on both backends, a real peer where the op
# has one, and the layout, patcher and command-line basics. test file -> test functions (every
# parametrization of each).
SMOKE = {
    "test_layout.py": ("test_no_checkout_folder_shadows_an_installed_distribution", "test_no_import_cycles",
                       "test_imports_point_down_the_floors"),
    "test_foundation.py": ("test_import_is_quiet_and_cheap", "test_checks_name_argument_expected_and_received"),
    "test_patch_embed.py": ("test_edge_shapes_give_correct_results", "test_float_images_mean_std_image_grad_and_remainder",
                            "test_module_loads_timm_state_dict_and_matches"),
    "test_codebook_search.py": ("test_agrees_with_reference", "test_ties_go_to_lowest_index", "test_distance_gradients"),
    "test_vq.py": ("test_eval_matches_vqtorch_same_codebook", "test_ema_update_matches_formulas",
                   "test_commitment_loss_and_gradient"),
    "test_residual_vq_beam.py": ("test_one_beam_is_the_greedy_quantizer",),
    "test_tome_reference.py": ("test_hand_computed", "test_merge_wavg_and_source_match_oracle"),
    "test_tome.py": ("test_gradients_match_reference", "test_torch_path_scores_like_the_reference"),
    "test_compress.py": ("test_compress_dispatches_every_method", "test_avg_and_max_match_transformers_llava_next_video_pooler",
                         "test_prumerge_matches_the_official_loop"),
    "test_dart.py": ("test_matches_the_official_rule",),
    "test_attention.py": ("test_cross_attention_lengths_and_scale", "test_strided_views_of_one_qkv_tensor"),
    "test_attention_scores.py": ("test_scale_and_uniform_keys", "test_key_mask_hides_keys_and_empty_rows_give_zero"),
    "test_merge_project.py": ("test_backends_agree", "test_fp16_triton"),
    "test_project_modules.py": ("test_state_dict_loads_strictly_both_ways",),
    "test_adaptive.py": ("test_entropy_kernel_equals_reference_exactly", "test_quadtree_covers_every_pixel_exactly_once"),
    "test_pyramid.py": ("test_every_level_is_resampled_from_the_input",),
    "test_metrics.py": ("test_ssim_matches_scikit_image", "test_clip_score_matches_torchmetrics"),
    "test_budget.py": ("test_llava_next_matches_transformers", "test_qwen2_vl_matches_transformers"),
    "test_patcher_timm_embed.py": ("test_patch_twice_then_unpatch_restores_original",),
    "test_patcher_timm_tome.py": ("test_token_counts_follow_the_schedule",),
    "test_patcher_hf_embed.py": ("test_state_dict_unchanged_patch_twice_and_unpatch",),
    "test_patcher_entry.py": ("test_failing_call_leaves_no_tome", "test_image_token_count_answers_for_every_patch"),
    "test_patcher_hf_fastv.py": ("test_kept_tokens_keep_their_position_ids",),
    "test_cli.py": ("test_bench_out_naming_a_file_is_a_one_line_error",),
}


def _mark_smoke(items) -> None:
    for item in items:
        if getattr(item, "originalname", item.name) in SMOKE.get(item.path.name, ()):
            item.add_marker(pytest.mark.smoke)


def pytest_collection_modifyitems(config, items):
    _mark_smoke(items)
    if GPU_RUN:
        return
    kept, dropped = [], []
    for item in items:
        (dropped if item.get_closest_marker("gpu") else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


SEED = int(os.environ.get("VTOK_FAST_TEST_SEED", "0"))


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from one seed; ``VTOK_FAST_TEST_SEED`` picks another, to check that no
    test depends on a lucky draw."""
    torch.manual_seed(SEED)
    yield


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """References are float64 and the fp32 contract is IEEE: no TF32 in cuDNN convs or matmuls
    (matters on GPU runs only)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Run a test on the PyTorch path and on the Triton kernels (the interpreter on CPU)."""
    monkeypatch.setenv("VTOK_FAST_BACKEND", request.param)
    return request.param


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests run: CUDA on a GPU run, else CPU under the interpreter."""
    return torch.device("cuda" if GPU_RUN else "cpu")


@pytest.fixture
def triton_backend(monkeypatch):
    """Force the Triton kernels (interpreter on CPU)."""
    monkeypatch.setenv("VTOK_FAST_BACKEND", "triton")
    yield


@pytest.fixture
def torch_backend(monkeypatch):
    """Force the PyTorch path."""
    monkeypatch.setenv("VTOK_FAST_BACKEND", "torch")
    yield
