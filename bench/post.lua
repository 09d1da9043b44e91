-- wrk: POST one noop task per request.
wrk.method = "POST"
wrk.body = '{"task_type": "noop", "task_input": {"n": 1}}'
wrk.headers["Content-Type"] = "application/json"
