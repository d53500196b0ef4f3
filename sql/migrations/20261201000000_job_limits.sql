-- What a user can insert is bounded: the payload's shape at insert, the accepted range of every
-- field per job type (data an operator changes with an UPDATE, readable by frontends), a run-time
-- limit per job type, a priority ceiling for end users, and job types only the service may submit.

-- A payload is an object, never deeper than 32 levels, with no number longer than 100 characters
-- (Python cannot load a 4,401-digit number) and at most 1 MiB: anything else is refused at insert,
-- for everyone; end users also meet their quotas (jobs_enforce_limits).
create function public.jobs_check_payload() returns trigger
language plpgsql set search_path = '' as $$
declare
  longest_number integer;
begin
  if jsonb_typeof(new.payload) is distinct from 'object' then
    raise exception using
      errcode = '22023',
      message = format('The payload must be a JSON object, not %s.', coalesce(jsonb_typeof(new.payload), 'null')),
      hint = 'Send {"prompt": ..., "config": {...}}.';
  end if;
  if octet_length(new.payload::text) > 1048576 then
    raise exception using
      errcode = '22023',
      message = 'The payload is larger than 1 MiB.',
      hint = 'Send references as URLs or storage paths, not inline data.';
  end if;
  if jsonb_path_exists(new.payload, 'strict $.**{32}') then
    raise exception using
      errcode = '22023',
      message = 'The payload nests deeper than 32 levels.',
      hint = 'Send a flatter request.';
  end if;
  select max(length(v::text)) into longest_number
  from jsonb_path_query(new.payload, 'strict $.** ? (@.type() == "number")') as v;
  if longest_number > 100 then
    raise exception using
      errcode = '22023',
      message = format('The payload holds a number of %s characters; numbers may have at most 100.', longest_number),
      hint = 'Send ordinary numbers.';
  end if;
  return new;
end
$$;

revoke all on function public.jobs_check_payload() from public, anon, authenticated;

-- Named to fire first among the before-insert triggers (they fire in name order).
create trigger jobs_aa_check_payload before insert or update of payload on public.jobs
  for each row execute function public.jobs_check_payload();

-- Limits per job type: field -> {"min", "max"} | {"in": [...]} | {"max_length"}; the worker checks
-- them before any model work (worker/jobs.py check_limits). max_run_seconds: past it a running job
-- is stopped with TIMEOUT_ERROR. users_may_submit: false for types only the service may insert.
alter table public.job_types
  add column limits jsonb not null default '{}' check (jsonb_typeof(limits) = 'object'),
  add column max_run_seconds integer check (max_run_seconds > 0),
  add column users_may_submit boolean not null default true;

comment on column public.job_types.limits is
  'Accepted range of each field a user sets (payload or config): {"min","max"} | {"in":[...]} | {"max_length"}.';
comment on column public.job_types.max_run_seconds is
  'Run-time limit of one attempt, counted once its model is loaded; past it the job ends TIMEOUT_ERROR (retried).';
comment on column public.job_types.users_may_submit is 'false: only the service role (CLI, backends) may insert jobs of this type.';

update public.job_types set max_run_seconds = greatest(60, 5 * coalesce(expected_seconds, 60));

-- Seed 004: sides 256-1024, steps 10-50; seed 002: num_images 1, 3 or 6; seed 001: prompts <= 1000 characters.
update public.job_types set limits = '{
  "width": {"min": 256, "max": 1024}, "height": {"min": 256, "max": 1024},
  "steps": {"min": 10, "max": 50}, "guidance_scale": {"min": 1, "max": 20},
  "num_images": {"in": [1, 3, 6]}, "seed": {"min": 0, "max": 4294967295},
  "prompt": {"max_length": 1000}, "negative_prompt": {"max_length": 1000}
}' where handler = 'sdxl';

-- Seed 004: frames 16-81 (seed 002's 83 is rounded to 81 by the handler); images are one frame.
update public.job_types set limits = '{
  "width": {"min": 256, "max": 1024}, "height": {"min": 256, "max": 1024},
  "steps": {"min": 10, "max": 50}, "guidance_scale": {"min": 1, "max": 20},
  "frame_num": {"min": 16, "max": 83}, "fps": {"min": 8, "max": 30}, "num_images": {"in": [1]},
  "sample_shift": {"min": 1, "max": 20}, "seed": {"min": 0, "max": 4294967295},
  "prompt": {"max_length": 1000}, "negative_prompt": {"max_length": 1000}
}' where handler = 'wan' and content_type = 'video';

update public.job_types set limits = '{
  "width": {"min": 256, "max": 1024}, "height": {"min": 256, "max": 1024},
  "steps": {"min": 10, "max": 50}, "guidance_scale": {"min": 1, "max": 20},
  "frame_num": {"in": [1]}, "num_images": {"in": [1]},
  "sample_shift": {"min": 1, "max": 20}, "seed": {"min": 0, "max": 4294967295},
  "prompt": {"max_length": 1000}, "negative_prompt": {"max_length": 1000}
}' where handler = 'wan' and content_type = 'image';

-- Seeds 000/001/003: replies up to 2048 tokens, temperature 0-1, top_p 0.1-1.
update public.job_types set limits = '{
  "max_tokens": {"min": 1, "max": 2048}, "temperature": {"min": 0, "max": 1}, "top_p": {"min": 0.1, "max": 1},
  "history_limit": {"min": 0, "max": 50},
  "message": {"max_length": 32000}, "prompt": {"max_length": 32000}, "system_prompt": {"max_length": 32000},
  "scenario": {"max_length": 32000}, "messages": {"max_length": 200}, "conversation_history": {"max_length": 200}
}' where handler = 'chat';

-- simulate holds a slot and no GPU: bounded, and not for end users (demos, the CLI and tests keep it).
update public.job_types
set limits = '{"steps": {"min": 1, "max": 1000}, "step_seconds": {"min": 0, "max": 10}}',
    max_run_seconds = 600, users_may_submit = false
where name = 'simulate';

-- Frontends list what their users may submit.
drop policy job_types_read_enabled on public.job_types;
create policy job_types_read_enabled on public.job_types for select to anon, authenticated
  using (enabled and users_may_submit);

drop policy jobs_insert_own on public.jobs;
create policy jobs_insert_own on public.jobs for insert to authenticated
  with check (
    user_id = (select auth.uid())
    and status = 'queued'
    and exists (select 1 from public.job_types as t
                where t.name = jobs.job_type and t.enabled and t.users_may_submit)
    and exists (select 1 from public.job_limits(jobs.job_type) as l
                where jobs.priority between coalesce(l.min_priority, -100) and coalesce(l.max_priority, 100))
  );

-- End users may lower their jobs' priority, never raise it (operators change this row); the
-- service role and the CLI keep the full range.
update public.job_quotas set min_priority = -100, max_priority = 0
where job_type is null and min_priority = 0 and max_priority = 10;

-- The insert checks of end users, now covering every text of the payload (roleplay character,
-- scenario, history, metadata ...) and types only the service may submit.
create or replace function public.jobs_enforce_limits() returns trigger
language plpgsql set search_path = '' as $$
declare
  lim record;
  n integer;
  n_type integer;
  longest integer;
  bytes integer;
begin
  if current_user <> 'authenticated' and coalesce(auth.role(), '') <> 'authenticated' then
    return new;
  end if;

  if not exists (select 1 from public.job_types where name = new.job_type and enabled and users_may_submit) then
    raise exception using
      errcode = 'OVTYP',
      message = format('Job type "%s" is not available.', new.job_type),
      detail = jsonb_build_object('job_type', new.job_type)::text,
      hint = 'Choose one of the job types listed in public.job_types.';
  end if;

  select * into lim from public.job_limits(new.job_type);

  if new.priority < lim.min_priority or new.priority > lim.max_priority then
    raise exception using
      errcode = 'OVQTA',
      message = format('Priority %s is not allowed; the range is %s to %s.',
                       new.priority, lim.min_priority, lim.max_priority),
      detail = jsonb_build_object('quota', 'priority', 'min', lim.min_priority, 'max', lim.max_priority,
                                  'current', new.priority, 'job_type', new.job_type)::text,
      hint = 'Leave priority out or choose one within the range.';
  end if;

  bytes := octet_length(new.payload::text);
  if bytes > lim.max_payload_bytes then
    raise exception using
      errcode = 'OVQTA',
      message = format('The request is too large (%s bytes); the limit is %s bytes.', bytes, lim.max_payload_bytes),
      detail = jsonb_build_object('quota', 'max_payload_bytes', 'limit', lim.max_payload_bytes,
                                  'current', bytes, 'job_type', new.job_type)::text,
      hint = 'Send a smaller request.';
  end if;

  -- every string anywhere in the payload: prompts, messages, history, character, scenario, metadata
  select max(char_length(v #>> '{}')) into longest
  from jsonb_path_query(new.payload, 'strict $.** ? (@.type() == "string")') as v;
  if longest > lim.max_prompt_chars then
    raise exception using
      errcode = 'OVQTA',
      message = format('A text of the request is too long (%s characters); the limit is %s.',
                       longest, lim.max_prompt_chars),
      detail = jsonb_build_object('quota', 'max_prompt_chars', 'limit', lim.max_prompt_chars,
                                  'current', longest, 'job_type', new.job_type)::text,
      hint = 'Shorten the prompt.';
  end if;

  if coalesce(lim.max_active_jobs, lim.type_max_active_jobs, lim.max_jobs_per_minute,
              lim.type_max_jobs_per_minute) is null then
    return new;
  end if;

  -- One inserter per user at a time, until commit: concurrent requests see each other's rows
  -- and cannot overshoot. Two-key form: its own lock space, apart from bigint advisory keys.
  perform pg_advisory_xact_lock(28534, hashtext(new.user_id::text));

  select count(*), count(*) filter (where job_type = new.job_type) into n, n_type
  from public.jobs
  where user_id = new.user_id and status in ('queued', 'processing');
  if n >= lim.max_active_jobs then
    raise exception using
      errcode = 'OVQTA',
      message = format('You already have %s jobs queued or running; the limit is %s.', n, lim.max_active_jobs),
      detail = jsonb_build_object('quota', 'max_active_jobs', 'limit', lim.max_active_jobs,
                                  'current', n, 'job_type', null)::text,
      hint = 'Wait for a job to finish, or cancel one.';
  end if;
  if n_type >= lim.type_max_active_jobs then
    raise exception using
      errcode = 'OVQTA',
      message = format('You already have %s %s jobs queued or running; the limit is %s.',
                       n_type, new.job_type, lim.type_max_active_jobs),
      detail = jsonb_build_object('quota', 'max_active_jobs', 'limit', lim.type_max_active_jobs,
                                  'current', n_type, 'job_type', new.job_type)::text,
      hint = 'Wait for a job to finish, or cancel one.';
  end if;

  select count(*), count(*) filter (where job_type = new.job_type) into n, n_type
  from public.jobs
  where user_id = new.user_id and created_at > now() - interval '1 minute';
  if n >= lim.max_jobs_per_minute then
    raise exception using
      errcode = 'OVQTA',
      message = format('Too many requests: at most %s jobs per minute.', lim.max_jobs_per_minute),
      detail = jsonb_build_object('quota', 'max_jobs_per_minute', 'limit', lim.max_jobs_per_minute,
                                  'current', n, 'job_type', null)::text,
      hint = 'Try again in a minute.';
  end if;
  if n_type >= lim.type_max_jobs_per_minute then
    raise exception using
      errcode = 'OVQTA',
      message = format('Too many requests: at most %s %s jobs per minute.',
                       lim.type_max_jobs_per_minute, new.job_type),
      detail = jsonb_build_object('quota', 'max_jobs_per_minute', 'limit', lim.type_max_jobs_per_minute,
                                  'current', n_type, 'job_type', new.job_type)::text,
      hint = 'Try again in a minute.';
  end if;
  return new;
end
$$;

comment on column public.job_quotas.max_prompt_chars is 'Longest text anywhere in the payload (prompt, messages, history, character, scenario ...).';

-- A no-op update (cancel_requested = false on a queued job) wakes no worker.
drop trigger jobs_notify_update on public.jobs;
create trigger jobs_notify_update after update of status, cancel_requested on public.jobs
  for each row
  when (old.status is distinct from new.status or old.cancel_requested is distinct from new.cancel_requested)
  execute function public.jobs_notify();

-- The worker's own faults (scope -> reason), so an operator sees why a worker is not taking work.
alter table public.workers add column faults jsonb not null default '{}';
comment on column public.workers.faults is
  'Faults of the worker''s own (storage key refused, model that cannot load, device): scope -> reason; empty when healthy.';
