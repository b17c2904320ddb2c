"""Pins Keras to the TensorFlow backend before keras is first imported, and describes the device.

Every module of this backend imports keras through this one (`from ._env import keras, tf`), so
the pin always happens first. Keras reads KERAS_BACKEND once, at its first import: if something
else imported it earlier with another backend, the model would silently run elsewhere, so we refuse.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from capsctl.errors import CapsctlError

BACKEND = "tensorflow"

if "keras" in sys.modules:
    _other = sys.modules["keras"].backend.backend()
    if _other != BACKEND:
        raise CapsctlError(
            f"keras was already imported with the {_other!r} backend; capsctl's keras backend needs "
            f"{BACKEND!r} (unset KERAS_BACKEND or set it to {BACKEND})"
        )
else:
    os.environ["KERAS_BACKEND"] = BACKEND


# set beside TF_CPP_MIN_LOG_LEVEL when capsctl set that, so that the processes it starts (the ranks of
# --nproc) inherit the variable as capsctl's, not the user's, and quiet TensorFlow's banners too
_OURS = "CAPSCTL_QUIETED_TF"


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """TensorFlow's C++ start-up banners (oneDNN, CPU features) go to fd 2 before its logging is
    configured, so TF_CPP_MIN_LOG_LEVEL cannot silence them; a CLI's stderr is for messages. (On CPUs
    where TensorFlow turns its oneDNN operations on, such as Intel's with AVX-512, its import prints
    two of them.) Users who set TF_CPP_MIN_LOG_LEVEL themselves see everything as they asked."""
    user_set = "TF_CPP_MIN_LOG_LEVEL" in os.environ and os.environ.get(_OURS) != "1"
    if user_set or "tensorflow" in sys.modules:
        yield
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    os.environ[_OURS] = "1"
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


with _quiet_stderr():
    import keras
    import tensorflow as tf

# Each runner and trainer compiles its own tf.function on purpose (one per model); TensorFlow's
# "N calls triggered tf.function retracing" advice does not apply to that and would only alarm.
tf.get_logger().addFilter(lambda record: "triggered tf.function retracing" not in record.getMessage())

if keras.backend.backend() != BACKEND:  # e.g. a keras.json that overrides the variable
    raise CapsctlError(
        f"keras runs on the {keras.backend.backend()!r} backend; capsctl's keras backend needs {BACKEND!r}"
    )


def use_capsctl_defaults() -> None:
    """Keras' own defaults for everything capsctl runs through this backend (float32 everywhere,
    channels-last), whatever the user's keras.json says: layers, optimiser variables and the constants a
    traced step makes all read floatx, the layout and the dtype policy, and a `"float16"` or
    `"channels_first"` there rounded the learning rate, broke the graph or rounded exported weights.
    Set for the process (capsctl's commands); `capsctl_keras.load_model` in a user's program builds its
    layers the same way without touching their settings (_layers.keras_defaults)."""
    keras.config.set_floatx("float32")
    keras.config.set_image_data_format("channels_last")
    keras.config.set_dtype_policy("float32")


def describe() -> str:
    gpus = tf.config.list_logical_devices("GPU")
    threads = tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count()
    where = gpus[0].name if gpus else f"cpu, {threads} threads"
    return f"keras {keras.__version__} / tensorflow {tf.__version__} ({where})"
