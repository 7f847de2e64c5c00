"""tl_keras: transfer learning for image classification with Keras 3 and TensorFlow."""
