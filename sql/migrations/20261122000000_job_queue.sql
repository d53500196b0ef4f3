-- The job table, its types and the worker registry. The row is the API: frontends insert
-- and watch `jobs`, workers claim and finish them. Runtime SQL lives in worker/queue.py.

create type public.job_status as enum (
  'queued',      -- inserted by a frontend or the CLI; also a retry or a rescued lease. Left by a worker's claim or by a cancel request
  'processing',  -- claimed by a worker, which holds a lease. Left by that worker's finish, a retry, a release at shutdown, or the rescue of an expired lease
  'completed',   -- terminal: result published by the worker that held the lease
  'failed',      -- terminal: non-retryable error, attempts exhausted, or unknown job type at insert
  'canceled'     -- terminal: cancel_requested while queued (at once) or while processing (at the handler's next progress point)
);

create table public.job_types (
  name text primary key,
  queue text not null,
  handler text not null,
  model text,
  content_type text check (content_type in ('image', 'video', 'text')),
  file_extension text,
  bucket text,
  defaults jsonb not null default '{}',
  expected_seconds integer,
  max_attempts integer not null default 3 check (max_attempts between 1 and 20),
  enabled boolean not null default true,
  description text,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);

create table public.jobs (
  id uuid primary key default gen_random_uuid(),
  user_id uuid default auth.uid() references auth.users (id) on delete cascade,
  job_type text not null,
  queue text not null default '',
  status public.job_status not null default 'queued',
  payload jsonb not null default '{}',
  priority integer not null default 0 check (priority between -100 and 100),
  run_at timestamptz not null default now(),
  attempts integer not null default 0 check (attempts >= 0),
  max_attempts integer not null check (max_attempts between 1 and 20), -- from job_types unless given
  worker_id text,
  lease_expires_at timestamptz,
  progress smallint not null default 0 check (progress between 0 and 100),
  stage text,
  cancel_requested boolean not null default false,
  result jsonb,
  error jsonb,
  errors jsonb not null default '[]' check (jsonb_typeof(errors) = 'array'),
  created_at timestamptz not null default now(),
  started_at timestamptz,
  finished_at timestamptz,
  updated_at timestamptz not null default now(),
  constraint jobs_finished_iff_terminal
    check ((status in ('completed', 'failed', 'canceled')) = (finished_at is not null)),
  constraint jobs_processing_has_lease
    check (status <> 'processing' or (worker_id is not null and lease_expires_at is not null)),
  constraint jobs_completed_has_result
    check (status <> 'completed' or result is not null),
  constraint jobs_failed_has_error
    check (status <> 'failed' or error is not null)
);

comment on table public.jobs is 'One row per generation request; status, progress and result are written by workers only.';

-- Serves the claim: only queued rows are indexed, in claim order.
create index jobs_claim_idx on public.jobs (priority desc, run_at, id) where status = 'queued';
-- Serves the rescue of expired leases.
create index jobs_lease_idx on public.jobs (lease_expires_at) where status = 'processing';
-- Serves a user's own job list.
create index jobs_user_created_idx on public.jobs (user_id, created_at desc);

create table public.workers (
  id text primary key,
  host text not null,
  pid integer,
  queues text[] not null default '{}',
  job_types text[] not null default '{}',
  loaded_models jsonb not null default '[]',
  vram_used_mb integer,
  vram_total_mb integer,
  current_jobs uuid[] not null default '{}',
  state text not null default 'idle' check (state in ('idle', 'busy', 'draining', 'stopped')),
  version text,
  started_at timestamptz not null default now(),
  heartbeat_at timestamptz not null default now(),
  stopped_at timestamptz
);

-- Insert: the queue and attempt budget come from the job type; an unknown or disabled type
-- fails the row at once so the frontend sees why instead of a job that never starts.
create function public.jobs_before_insert() returns trigger language plpgsql as $$
declare
  jt public.job_types;
begin
  select * into jt from public.job_types where name = new.job_type;
  if not found or not jt.enabled then
    new.status := 'failed';
    new.max_attempts := coalesce(new.max_attempts, 3);
    new.queue := coalesce(jt.queue, '');
    new.finished_at := now();
    new.error := jsonb_build_object(
      'code', 'UNKNOWN_JOB_TYPE',
      'message', format('job type %L is %s', new.job_type, case when found then 'disabled' else 'not registered' end),
      'retryable', false);
    new.errors := jsonb_build_array(new.error);
    return new;
  end if;
  new.queue := jt.queue;
  new.max_attempts := coalesce(new.max_attempts, jt.max_attempts);
  return new;
end
$$;

create trigger jobs_before_insert before insert on public.jobs
  for each row execute function public.jobs_before_insert();

-- Update: enforce the state machine, keep updated_at, and turn a cancel request on a queued
-- job into `canceled` at once (a running job is stopped by its worker).
create function public.jobs_before_update() returns trigger language plpgsql as $$
begin
  if old.status in ('completed', 'failed', 'canceled') then
    raise exception 'job % is already %', old.id, old.status using errcode = 'check_violation';
  end if;
  if new.cancel_requested and not old.cancel_requested and old.status = 'queued' and new.status = 'queued' then
    new.status := 'canceled';
    new.stage := 'canceled';
    new.finished_at := now();
  end if;
  if new.status <> old.status and not (
    (old.status = 'queued' and new.status in ('processing', 'canceled', 'failed'))
    or (old.status = 'processing' and new.status in ('queued', 'completed', 'failed', 'canceled'))
  ) then
    raise exception 'job %: illegal transition % -> %', old.id, old.status, new.status
      using errcode = 'check_violation';
  end if;
  new.updated_at := now();
  return new;
end
$$;

create trigger jobs_before_update before update on public.jobs
  for each row execute function public.jobs_before_update();

-- Wake idle workers: a job became claimable (insert or retry), or a running job was asked to stop.
create function public.jobs_notify() returns trigger language plpgsql as $$
begin
  if new.status = 'queued' then
    perform pg_notify('ourvidz_jobs', new.queue);
  elsif new.status = 'processing' and new.cancel_requested
        and (tg_op = 'INSERT' or not old.cancel_requested) then
    perform pg_notify('ourvidz_cancel', new.id::text);
  end if;
  return null;
end
$$;

create trigger jobs_notify_insert after insert on public.jobs
  for each row when (new.status = 'queued') execute function public.jobs_notify();
create trigger jobs_notify_update after update of status, cancel_requested on public.jobs
  for each row execute function public.jobs_notify();

-- Workers refresh the job types they serve when this fires.
create function public.job_types_notify() returns trigger language plpgsql as $$
begin
  perform pg_notify('ourvidz_types', '');
  return null;
end
$$;

create trigger job_types_notify after insert or update or delete on public.job_types
  for each statement execute function public.job_types_notify();

-- Security by default: nothing is readable through the Data API until policies say so.
alter table public.jobs enable row level security;
alter table public.job_types enable row level security;
alter table public.workers enable row level security;

-- The presets of the seeds, as data. `defaults` holds the config a payload may override.
insert into public.job_types
  (name, queue, handler, model, content_type, file_extension, bucket, expected_seconds, defaults, description)
values
  ('sdxl_image_fast', 'sdxl', 'sdxl', 'sdxl', 'image', 'png', 'sdxl_image_fast', 30,
   '{"width": 1024, "height": 1024, "steps": 15, "guidance_scale": 6.0, "num_images": 1}',
   'SDXL text-to-image, fast preset'),
  ('sdxl_image_high', 'sdxl', 'sdxl', 'sdxl', 'image', 'png', 'sdxl_image_high', 42,
   '{"width": 1024, "height": 1024, "steps": 25, "guidance_scale": 7.5, "num_images": 1}',
   'SDXL text-to-image, high-quality preset'),
  ('image_fast', 'wan', 'wan', 'wan_t2v_1_3b', 'image', 'png', 'image_fast', 40,
   '{"width": 480, "height": 832, "steps": 25, "guidance_scale": 6.5, "frame_num": 1, "sample_solver": "unipc", "sample_shift": 5.0, "enhance_prompt": false}',
   'WAN 2.1 single frame, fast preset'),
  ('image_high', 'wan', 'wan', 'wan_t2v_1_3b', 'image', 'png', 'image_high', 100,
   '{"width": 480, "height": 832, "steps": 50, "guidance_scale": 7.5, "frame_num": 1, "sample_solver": "unipc", "sample_shift": 5.0, "enhance_prompt": false}',
   'WAN 2.1 single frame, high-quality preset'),
  ('video_fast', 'wan', 'wan', 'wan_t2v_1_3b', 'video', 'mp4', 'video_fast', 180,
   '{"width": 480, "height": 832, "steps": 25, "guidance_scale": 6.5, "frame_num": 83, "fps": 16, "sample_solver": "unipc", "sample_shift": 5.0, "enhance_prompt": false}',
   'WAN 2.1 text-to-video, fast preset'),
  ('video_high', 'wan', 'wan', 'wan_t2v_1_3b', 'video', 'mp4', 'video_high', 240,
   '{"width": 480, "height": 832, "steps": 50, "guidance_scale": 7.5, "frame_num": 83, "fps": 16, "sample_solver": "unipc", "sample_shift": 5.0, "enhance_prompt": false}',
   'WAN 2.1 text-to-video, high-quality preset'),
  ('image7b_fast_enhanced', 'wan', 'wan', 'wan_t2v_1_3b', 'image', 'png', 'image7b_fast_enhanced', 100,
   '{"width": 480, "height": 832, "steps": 25, "guidance_scale": 6.5, "frame_num": 1, "sample_solver": "unipc", "sample_shift": 5.0, "enhance_prompt": true}',
   'WAN 2.1 single frame with Qwen prompt enhancement, fast preset'),
  ('image7b_high_enhanced', 'wan', 'wan', 'wan_t2v_1_3b', 'image', 'png', 'image7b_high_enhanced', 240,
   '{"width": 480, "height": 832, "steps": 50, "guidance_scale": 7.5, "frame_num": 1, "sample_solver": "unipc", "sample_shift": 5.0, "enhance_prompt": true}',
   'WAN 2.1 single frame with Qwen prompt enhancement, high-quality preset'),
  ('video7b_fast_enhanced', 'wan', 'wan', 'wan_t2v_1_3b', 'video', 'mp4', 'video7b_fast_enhanced', 240,
   '{"width": 480, "height": 832, "steps": 25, "guidance_scale": 6.5, "frame_num": 83, "fps": 16, "sample_solver": "unipc", "sample_shift": 5.0, "enhance_prompt": true}',
   'WAN 2.1 text-to-video with Qwen prompt enhancement, fast preset'),
  ('video7b_high_enhanced', 'wan', 'wan', 'wan_t2v_1_3b', 'video', 'mp4', 'video7b_high_enhanced', 300,
   '{"width": 480, "height": 832, "steps": 50, "guidance_scale": 7.5, "frame_num": 83, "fps": 16, "sample_solver": "unipc", "sample_shift": 5.0, "enhance_prompt": true}',
   'WAN 2.1 text-to-video with Qwen prompt enhancement, high-quality preset'),
  ('chat_conversation', 'chat', 'chat', 'qwen_instruct', 'text', null, null, 15,
   '{"max_tokens": 500, "temperature": 0.7, "top_p": 0.9, "history_limit": 10, "system_prompt": "You are a helpful AI assistant for OurVidz, an adult content creation platform. You can help with creative writing, roleplay, and content generation. Be engaging and natural in your responses."}',
   'Qwen Instruct conversation'),
  ('chat_unrestricted', 'chat', 'chat', 'qwen_instruct', 'text', null, null, 15,
   '{"max_tokens": 500, "temperature": 0.7, "top_p": 0.9, "history_limit": 10, "alias_of": "chat_conversation", "system_prompt": "You are a helpful AI assistant for OurVidz, an adult content creation platform. You can help with creative writing, roleplay, and content generation. Be engaging and natural in your responses."}',
   'Retired by seed 001; served as chat_conversation'),
  ('chat_roleplay', 'chat', 'chat', 'qwen_instruct', 'text', null, null, 15,
   '{"max_tokens": 300, "temperature": 0.8, "top_p": 0.9, "history_limit": 5}',
   'Qwen Instruct character roleplay'),
  ('chat_enhance', 'chat', 'chat', 'qwen_instruct', 'text', null, null, 3,
   '{"max_tokens": 200, "temperature": 0.7, "top_p": 0.9, "target": "sdxl", "system_prompts": {"sdxl": "You rewrite short image prompts into detailed Stable Diffusion XL prompts: subject, composition, lighting, style and quality tags, comma separated, under 75 words. Reply with the prompt only.", "wan": "You rewrite short video prompts into detailed WAN 2.1 video prompts: subject, motion, camera movement, setting, lighting and style in one paragraph under 120 words. Reply with the prompt only."}}',
   'Qwen Instruct prompt enhancement for SDXL or WAN'),
  ('chat_generate', 'chat', 'chat', 'qwen_instruct', 'text', null, null, 15,
   '{"max_tokens": 512, "temperature": 0.7, "top_p": 0.9}',
   'Qwen Instruct generation from a messages array'),
  ('simulate', 'demo', 'simulate', null, 'text', null, null, 2,
   '{"steps": 10, "step_seconds": 0.2}',
   'Simulated work with progress for demos and smoke tests; no model');
