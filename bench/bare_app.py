"""The baseline for submit throughput: a bare Flask JSON endpoint, under the same gunicorn settings."""

from flask import Flask, request

app = Flask(__name__)


@app.post("/api/submit-task")
def submit():
    body = request.get_json()
    return {"task_id": 1, "status": "pending", "echo": type(body["task_input"]).__name__}, 202
