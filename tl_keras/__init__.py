"""tl_keras: transfer learning for image classification with Keras 3 and TensorFlow.

Each stage is a folder, and imports run one way, down this list: `cli` ->
`training` -> `outputs` -> `model` -> `data`. The modules beside the folders
(`config`, `console`, `errors`, `progress`, `rundir`) serve every stage and
import none. `tests/test_architecture.py` checks both rules.
"""
