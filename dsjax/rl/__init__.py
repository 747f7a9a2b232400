"""R1-style post-training, the model-independent core: rule rewards, GRPO math, a toy verifiable task and
the rejection filter for distillation data (DeepSeek-R1 paper)."""
from dsjax.rl.distill_filter import rejection_filter
from dsjax.rl.grpo import group_advantages, grpo_loss, k3_kl, token_logprobs
from dsjax.rl.rewards import (accuracy_reward, answers_match, combine_rewards, extract_answer, format_reward,
                              get_reward, list_rewards, normalize_answer, parse_number, register_reward,
                              resolve_reward, score_batch)
from dsjax.rl.toy_task import (R1_ZERO_TEMPLATE, TOY_TEMPLATE, format_prompt, is_held_out, make_problems,
                               reference_completion)

__all__ = ["accuracy_reward", "answers_match", "combine_rewards", "extract_answer", "format_reward", "get_reward",
           "list_rewards", "normalize_answer", "parse_number", "register_reward", "resolve_reward",
           "score_batch",
           "group_advantages", "grpo_loss", "k3_kl", "token_logprobs", "rejection_filter",
           "R1_ZERO_TEMPLATE", "TOY_TEMPLATE", "format_prompt", "is_held_out", "make_problems",
           "reference_completion"]
