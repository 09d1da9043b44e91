"""A client for the skiplock task queue's HTTP API: Client (sync) and AsyncClient (asyncio), the
same methods on both; typed results (models), typed errors (errors), safe retries (retries).

    from skiplock_client import Client

    with Client("http://127.0.0.1:8000", api_key="sk_...") as client:
        task = client.submit("greet", {"name": "Ada"})
        print(client.wait(task.id, timeout=60, raise_on_failure=True).result)
"""

__version__ = "0.1.0"  # before the imports: options.py sends it as the User-Agent

from .async_client import AsyncClient
from .client import Client
from .errors import (
    ApiError,
    BadRequest,
    Conflict,
    Forbidden,
    Gone,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServerError,
    SkiplockError,
    TaskFailed,
    TransportError,
    Unauthorized,
    Unavailable,
    ValidationError,
    WaitTimeout,
)
from .models import (
    Attempt,
    Batch,
    Fire,
    NewTask,
    Schedule,
    StreamToken,
    Task,
    TaskEvent,
    TaskPage,
    Workflow,
    WorkflowEvent,
)
from .retries import Retry

__all__ = [
    "ApiError",
    "AsyncClient",
    "Attempt",
    "BadRequest",
    "Batch",
    "Client",
    "Conflict",
    "Fire",
    "Forbidden",
    "Gone",
    "NewTask",
    "NotFound",
    "PayloadTooLarge",
    "RateLimited",
    "Retry",
    "Schedule",
    "ServerError",
    "SkiplockError",
    "StreamToken",
    "Task",
    "TaskEvent",
    "TaskFailed",
    "TaskPage",
    "TransportError",
    "Unauthorized",
    "Unavailable",
    "ValidationError",
    "WaitTimeout",
    "Workflow",
    "WorkflowEvent",
]
