/**
 * Where a signed-in user's queued jobs stand: the RPC `public.job_queue_position(job_ids)`
 * (migration 20261201002000_fair_claim.sql). It returns the caller's own queued jobs only, with
 * their place in their queue (users take turns, so a job waits behind at most one job of each other
 * user per round) and an estimated start from the queue's recent throughput.
 *
 * A place moves when other users' jobs start, which sends the caller nothing over Realtime, so
 * `watchQueuePosition` reads it again every few seconds until the job leaves the queue.
 */
import type { AnySupabaseClient } from './jobs'

export interface QueuePosition {
  job_id: string
  job_type: string
  queue: string
  priority: number
  /** 1: the next job of its queue to start. Counting stops at 10,000 jobs ahead (then 10001). */
  position: number
  /** false when more than 10,000 jobs are ahead and `position` shows the cap. */
  position_exact: boolean
  /** Jobs of the queue finished per minute lately (the last 15 minutes); null: none finished. */
  throughput_per_minute: number | null
  /** ISO timestamp: now + jobs ahead / throughput, not before the job's run_at; null without throughput. */
  estimated_start_at: string | null
}

export class QueuePositionError extends Error {
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message)
    this.name = 'QueuePositionError'
  }
}

/** The caller's queued jobs (all of them, or those of `jobIds`), in the order they will start. */
export async function getQueuePositions(
  supabase: AnySupabaseClient,
  jobIds?: readonly string[],
): Promise<QueuePosition[]> {
  const { data, error } = await supabase.rpc('job_queue_position', jobIds ? { job_ids: [...jobIds] } : {})
  if (error) throw new QueuePositionError(error.code, error.message)
  return (data ?? []) as QueuePosition[]
}

/** One job's place; null once it is no longer queued (running, ended) or not the caller's. */
export async function getQueuePosition(supabase: AnySupabaseClient, jobId: string): Promise<QueuePosition | null> {
  const [row] = await getQueuePositions(supabase, [jobId])
  return row ?? null
}

/** Milliseconds until the estimated start (0 once it is past); null when there is no estimate. */
export function msUntilStart(position: Pick<QueuePosition, 'estimated_start_at'>, now: number = Date.now()): number | null {
  if (position.estimated_start_at === null) return null
  return Math.max(0, Date.parse(position.estimated_start_at) - now)
}

export interface QueuePositionWatchOptions {
  /** Between reads; default 5000. */
  intervalMs?: number
  onError?: (err: Error) => void
}

/**
 * Calls `onPosition` with the job's place now and after each read, and with null once the job has
 * left the queue, which ends the watch. Returns a function that stops it earlier.
 */
export function watchQueuePosition(
  supabase: AnySupabaseClient,
  jobId: string,
  onPosition: (position: QueuePosition | null) => void,
  opts: QueuePositionWatchOptions = {},
): () => void {
  const intervalMs = opts.intervalMs ?? 5000
  let stopped = false
  let timer: ReturnType<typeof setTimeout> | undefined

  const read = async (): Promise<void> => {
    try {
      const position = await getQueuePosition(supabase, jobId)
      if (stopped) return
      onPosition(position)
      if (position === null) {
        stopped = true
        return
      }
    } catch (err) {
      if (stopped) return
      opts.onError?.(err instanceof Error ? err : new Error(String(err)))
    }
    timer = setTimeout(() => void read(), intervalMs)
  }

  void read()
  return () => {
    stopped = true
    if (timer !== undefined) clearTimeout(timer)
  }
}
