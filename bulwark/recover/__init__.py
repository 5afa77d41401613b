"""Recover: repair a fine-tuned model's alignment after the fact (the third stage, `bulwark recover`).

- method.py     gradient-ranked restore toward the aligned model, with rollback that protects the task
- safelora.py   SafeLoRA-style projection of fine-tuning updates onto the alignment subspace
- hidden.py     last-token hidden states and their gradients, one decoder layer at a time
- task.py       recovery / task prompts, the task metric, the HS figure
- checkpoints.py model folders read tensor by tensor; the repaired folder written shard by shard
- the stage itself is bulwark/recipes/recover.py (`bulwark recover CONFIG k=v`, started by bulwark/launch.py)
- config.py     the stage's typed config
"""

from bulwark.recover.config import RecoverConfig, load_recover_config
from bulwark.recover.restore import Restorer, RestoreResult, TaskMetric

__all__ = ["RecoverConfig", "RestoreResult", "Restorer", "TaskMetric", "load_recover_config"]
