-- wrk: one key flooding the API with submits, each connection pausing 10 ms between requests
-- (10 connections: about 1,000 requests/s); 429 answers are expected.
wrk.method = "POST"
wrk.body = '{"task_type": "noop", "task_input": {"n": 1}}'
wrk.headers["Content-Type"] = "application/json"

function delay()
    return 10
end
