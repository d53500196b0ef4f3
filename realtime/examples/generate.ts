// The README's end-to-end example, type-checked with the helper.
import { createClient } from '@supabase/supabase-js'

import { cancelJob, JobSubmitError, submitJob, watchJob, type JobRow } from '../src/jobs'

const supabase = createClient('https://your-project.supabase.co', 'your-anon-key')

export async function generate(prompt: string, onProgress: (percent: number, stage: string | null) => void) {
  await supabase.auth.signInWithPassword({ email: 'me@example.com', password: 'secret' })

  let job: JobRow
  try {
    job = await submitJob(supabase, 'sdxl_image_fast', { prompt }, { priority: 0 })
  } catch (err) {
    if (err instanceof JobSubmitError && err.isQuota) {
      throw new Error(`${err.message} ${err.hint ?? ''}`) // e.g. "Too many requests: at most 10 jobs per minute."
    }
    throw err
  }

  const watch = watchJob(supabase, job.id, (row) => onProgress(row.progress, row.stage), {
    timeoutMs: 10 * 60_000,
  })
  const final = await watch.done
  if (final.status === 'completed') {
    return (final.result?.assets ?? []).map((asset) => asset.url)
  }
  throw new Error(final.error ? `${final.error.code}: ${final.error.message}` : final.status)
}

export async function cancel(id: string): Promise<boolean> {
  return (await cancelJob(supabase, id)) !== null
}
