-- wrk: POST one noop task per request (post.lua's body); with the argument "traced" (wrk ... --
-- traced) each request carries a W3C traceparent header, whose context the API stores with the
-- task (skiplock/tracing.py). Without it, the same requests with no header: the baseline.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"task_type": "noop", "task_input": {"n": 1}}'

function init(args)
    if args[1] == "traced" then
        wrk.headers["traceparent"] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    end
end
