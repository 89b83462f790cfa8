"""Serving: the batching engine every protocol (HTTP, gRPC, OpenAI-style, web UI) runs on."""

from cosyjax.serving.engine import (DeadlineExceeded, Engine, EngineConfig, EngineMetrics, EngineStopped, Handle,
                                    QueueFull, RequestCancelled)

__all__ = ["DeadlineExceeded", "Engine", "EngineConfig", "EngineMetrics", "EngineStopped", "Handle", "QueueFull",
           "RequestCancelled"]
