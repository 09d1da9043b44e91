-- wrk: POST one noop task per request, each body built per request; with the argument "unique"
-- (wrk ... -- unique) every task carries a unique_key never used before (the run's start time,
-- the wrk thread, a counter), so no submit is deduplicated. Without it each body is built the
-- same way, with no unique_key (post.lua's body): the baseline pays the same client cost.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

local threads = 0

function setup(thread)
    threads = threads + 1
    thread:set("thread_id", threads)
end

function init(args)
    unique = args[1] == "unique"
    -- The warm-up and the measured run start seconds apart: their keys differ.
    prefix = string.format("bench-%d-%d-", os.time(), thread_id)
    sent = 0
end

function request()
    sent = sent + 1
    local key = ""
    if unique then
        key = string.format(', "unique_key": "%s%d"', prefix, sent)
    end
    return wrk.format(nil, nil, nil, '{"task_type": "noop", "task_input": {"n": 1}' .. key .. '}')
end
